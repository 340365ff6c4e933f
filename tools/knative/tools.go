//go:build tools

// Package tools pins knative.dev/serving, whose controller, activator,
// autoscaler, webhook and queue (queue-proxy) commands and install YAML
// (config/core) vhive builds and patches, and the knative.dev/networking and
// knative.dev/caching modules whose config fills the files the serving module
// zip leaves out (symlinks in its repository). It is a separate module so the
// main go.mod does not carry Knative's dependency graph.
package tools

import (
	_ "knative.dev/serving/cmd/activator"
	_ "knative.dev/serving/cmd/autoscaler"
	_ "knative.dev/serving/cmd/controller"
	_ "knative.dev/serving/cmd/queue"
	_ "knative.dev/serving/cmd/webhook"
)
