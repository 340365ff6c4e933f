// Package cri is vhive's Kubernetes Container Runtime Interface (CRI v1)
// server: the RuntimeService and ImageService kubelet talks to over a unix
// socket. It routes like vHive's CRI:
//
//   - a container named "user-container" whose env carries GUEST_IMAGE (a
//     Knative revision's function) runs in a vhive sandbox created from
//     GUEST_IMAGE through the FunctionBackend; the pod's env is passed through;
//   - the pod's "queue-proxy" container gets GUEST_ADDR and GUEST_PORT added to
//     its env, pointing at that sandbox's endpoint, and is then created by
//     containerd;
//   - pods whose runtime handler is Config.RuntimeHandler ("vhive") run every
//     container through the ContainerRuntime (an OCI runtime CLI, runc or
//     runsc, driven by this package) inside the pod's network namespace;
//   - everything else — other containers, every pod sandbox (its pause
//     container, network namespace and CNI setup), every image call — is
//     proxied unchanged to a stock containerd CRI endpoint.
//
// A vhive-handler pod is a containerd pod sandbox created with the default
// handler: containerd owns its pause container, network namespace, IP, DNS
// and port forwarding; vhive owns the pod's containers and joins them to the
// pod's network, IPC and UTS namespaces (PID too when the pod shares it).
//
// State kept on disk under Config.StateDir (JSON, written atomically on every
// change, schema version 1):
//
//	<StateDir>/state.json        {"version":1,"pods":{id:pod},"containers":{id:container}}
//	<StateDir>/pods/<id>/        hosts, hostname, resolv.conf of a vhive-handler pod
//	<StateDir>/containers/<id>/  bundle (config.json), overlay upper/work, rootfs mount
//
// After a daemon restart New reads state.json, removes every container it
// lists (OCI runtime delete, overlay unmount, directories) and keeps the
// vhive-handler pod records, whose pod sandboxes still live in containerd.
// Function sandboxes are not re-attached: the daemon's sandbox backend
// Cleanup removes them.
package cri
