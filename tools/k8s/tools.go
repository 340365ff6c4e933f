//go:build tools

// Package tools pins k8s.io/kubernetes for building kubelet, kube-apiserver,
// kube-scheduler, kube-controller-manager, kube-proxy and kubectl
// (scripts/k8s/build.sh).
// It is a separate module so the main go.mod does not carry Kubernetes'
// dependency graph. Each staging module is replaced by its published v0.37.2
// release, since the kubernetes module's own replaces point into its tree.
package tools

import (
	_ "go.etcd.io/etcd/server/v3/embed"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
