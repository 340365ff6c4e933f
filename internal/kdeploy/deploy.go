// Package kdeploy deploys vHive-shaped functions on a Kubernetes cluster
// whose nodes run vhive as their CRI: the cluster mode of `vhive deployer`.
//
// Input is vSwarm's deployer file ({"functions":[{"name","file","count"}]},
// "file" a Knative Service manifest in vHive's shape, see
// deploy/knative-helloworld.yaml) or one such manifest. Knative Serving
// cannot run here, so each function becomes what Knative would create for
// its first revision:
//
//   - a Deployment <name>-00001-deployment of revision-shaped pods: the
//     manifest's container renamed user-container (GUEST_IMAGE, GUEST_PORT,
//     K_REVISION, PORT — vhive's CRI runs GUEST_IMAGE in a sandbox) and a
//     queue-proxy container (cmd/vhive-queue-proxy) that relays port 8012 to
//     the GUEST_ADDR:GUEST_PORT the CRI gives it and answers the readiness
//     probe; short not-ready/unreachable NoExecute tolerations so that pods
//     of a failed node are recreated elsewhere within seconds, and a soft
//     spread over nodes;
//   - a ClusterIP Service <name> (port 80 → 8012, appProtocol h2c) that
//     kube-proxy balances per connection over the ready pods.
//
// Every object carries app.kubernetes.io/managed-by=vhive and Knative's
// serving.knative.dev/{service,configuration,revision} labels; objects that
// exist and are not vhive's are never replaced. Replicas come from the
// template's autoscaling.knative.dev/min-scale annotation, else
// Options.Replicas (there is no autoscaler; Scale sets them).
//
// The endpoints file written for `vhive invoker` names each function by its
// Service DNS name (<name>.<namespace>.svc.cluster.local) and gives the
// Service's ClusterIP:80 as the address to dial.
package kdeploy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"vhive.dev/vhive/internal/invoker"
)

// Options configures Deploy.
type Options struct {
	ObjectOptions
	// FuncPath is the directory relative manifest paths are resolved in.
	FuncPath string
	// Replace updates functions that exist (if vhive manages them).
	Replace bool
	// Wait, if > 0, waits this long for every function to have all its
	// replicas ready behind its Service.
	Wait   time.Duration
	Logger *slog.Logger
}

// Function is a deployed function.
type Function struct {
	Name       string // the Service's name
	Namespace  string
	Deployment string
	Replicas   int32
	ClusterIP  string
}

// Hostname is the function's Service DNS name.
func (f Function) Hostname() string { return f.Name + "." + f.Namespace + ".svc.cluster.local" }

// Address is where the function's Service is dialled.
func (f Function) Address() string {
	return net.JoinHostPort(f.ClusterIP, strconv.Itoa(ServicePort))
}

// Selector selects the function's pods.
func (f Function) Selector() string {
	return labels.SelectorFromSet(labels.Set{LabelRevision: RevisionName(f.Name)}).String()
}

// Endpoints are the invoker's endpoints of fns.
func Endpoints(fns []Function) []invoker.Endpoint {
	eps := make([]invoker.Endpoint, len(fns))
	for i, f := range fns {
		eps[i] = invoker.Endpoint{Hostname: f.Hostname(), Address: f.Address()}
	}
	return eps
}

// Deploy deploys Count copies of each function of fns (vSwarm's naming:
// <name>-0 … <name>-<Count-1>), each from the Knative Service manifest its
// File names. Manifests are all read and checked before anything is
// created. On error, what was deployed stays; the error names the function.
func Deploy(ctx context.Context, cs kubernetes.Interface, fns []invoker.FunctionEntry, o Options) ([]Function, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	type job struct {
		name string
		svc  *Service
	}
	var jobs []job
	for _, f := range fns {
		p := f.File
		if !filepath.IsAbs(p) && o.FuncPath != "" {
			p = filepath.Join(o.FuncPath, p)
		}
		svc, err := ReadService(p)
		if err != nil {
			return nil, fmt.Errorf("function %q: %w", f.Name, err)
		}
		if f.Count == 0 {
			o.Logger.Warn("function has count 0; nothing deployed", "function", f.Name)
		}
		for i := range f.Count {
			jobs = append(jobs, job{name: f.Name + "-" + strconv.Itoa(i), svc: svc})
		}
	}
	var out []Function
	for _, j := range jobs {
		fn, err := DeployService(ctx, cs, j.svc, j.name, o)
		if err != nil {
			return out, err
		}
		out = append(out, fn)
	}
	if o.Wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, o.Wait)
		defer cancel()
		for _, fn := range out {
			if err := WaitReady(wctx, cs, fn, fn.Replicas); err != nil {
				return out, err
			}
			o.Logger.Info("function ready", "function", fn.Name, "replicas", fn.Replicas, "address", fn.Address())
		}
	}
	return out, nil
}

// DeployService creates (or, with o.Replace, updates) the objects of svc
// deployed as function name.
func DeployService(ctx context.Context, cs kubernetes.Interface, svc *Service, name string, o Options) (Function, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	dep, s, err := Objects(svc, name, o.ObjectOptions)
	if err != nil {
		return Function{}, fmt.Errorf("function %q: %w", name, err)
	}
	ns := dep.Namespace
	fn := Function{Name: name, Namespace: ns, Deployment: dep.Name, Replicas: *dep.Spec.Replicas}
	deps := cs.AppsV1().Deployments(ns)
	old, err := deps.Get(ctx, dep.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := deps.Create(ctx, dep, metav1.CreateOptions{}); err != nil {
			return fn, fmt.Errorf("function %q: create deployment %s/%s: %w", name, ns, dep.Name, err)
		}
	case err != nil:
		return fn, fmt.Errorf("function %q: get deployment %s/%s: %w", name, ns, dep.Name, err)
	default:
		if err := replaceable(old.ObjectMeta, "deployment", o.Replace); err != nil {
			return fn, fmt.Errorf("function %q: %w", name, err)
		}
		old.Labels, old.Annotations, old.Spec = dep.Labels, dep.Annotations, dep.Spec
		if _, err := deps.Update(ctx, old, metav1.UpdateOptions{}); err != nil {
			return fn, fmt.Errorf("function %q: update deployment %s/%s: %w", name, ns, dep.Name, err)
		}
	}
	svcs := cs.CoreV1().Services(ns)
	cur, err := svcs.Get(ctx, s.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if cur, err = svcs.Create(ctx, s, metav1.CreateOptions{}); err != nil {
			return fn, fmt.Errorf("function %q: create service %s/%s: %w", name, ns, s.Name, err)
		}
	case err != nil:
		return fn, fmt.Errorf("function %q: get service %s/%s: %w", name, ns, s.Name, err)
	default:
		if err := replaceable(cur.ObjectMeta, "service", o.Replace); err != nil {
			return fn, fmt.Errorf("function %q: %w", name, err)
		}
		cur.Labels, cur.Annotations = s.Labels, s.Annotations
		cur.Spec.Selector, cur.Spec.Ports, cur.Spec.Type = s.Spec.Selector, s.Spec.Ports, s.Spec.Type
		if cur, err = svcs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return fn, fmt.Errorf("function %q: update service %s/%s: %w", name, ns, s.Name, err)
		}
	}
	fn.ClusterIP = cur.Spec.ClusterIP
	if net.ParseIP(fn.ClusterIP) == nil {
		return fn, fmt.Errorf("function %q: service %s/%s has no cluster IP (%q)", name, ns, s.Name, fn.ClusterIP)
	}
	o.Logger.Info("deployed", "function", name, "deployment", dep.Name, "replicas", fn.Replicas,
		"guest_image", guestImage(dep.Spec.Template.Spec.Containers[0]), "cluster_ip", fn.ClusterIP)
	return fn, nil
}

// ErrExists is returned for an object that exists and may not be replaced.
var ErrExists = errors.New("already exists")

func replaceable(m metav1.ObjectMeta, kind string, replace bool) error {
	if m.Labels[LabelManaged] != ManagedBy {
		return fmt.Errorf("%s %s/%s %w and is not managed by vhive (label %s=%s); not touched", kind, m.Namespace, m.Name, ErrExists, LabelManaged, ManagedBy)
	}
	if !replace {
		return fmt.Errorf("%s %s/%s %w (deploy with replace to update it)", kind, m.Namespace, m.Name, ErrExists)
	}
	return nil
}

// Scale sets the replicas of fn's Deployment through its scale subresource.
func Scale(ctx context.Context, cs kubernetes.Interface, fn Function, replicas int32) error {
	if replicas < 0 {
		return fmt.Errorf("scale function %q to %d replicas: negative", fn.Name, replicas)
	}
	_, err := cs.AppsV1().Deployments(fn.Namespace).UpdateScale(ctx, fn.Deployment, &autoscalingv1.Scale{
		ObjectMeta: metav1.ObjectMeta{Name: fn.Deployment, Namespace: fn.Namespace},
		Spec:       autoscalingv1.ScaleSpec{Replicas: replicas},
	}, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("scale function %q to %d replicas: %w", fn.Name, replicas, err)
	}
	return nil
}

// Remove deletes fn's Deployment (and its pods) and Service.
func Remove(ctx context.Context, cs kubernetes.Interface, fn Function) error {
	bg := metav1.DeletePropagationBackground
	var errs []error
	if err := cs.AppsV1().Deployments(fn.Namespace).Delete(ctx, fn.Deployment, metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("delete deployment %s/%s: %w", fn.Namespace, fn.Deployment, err))
	}
	if err := cs.CoreV1().Services(fn.Namespace).Delete(ctx, fn.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("delete service %s/%s: %w", fn.Namespace, fn.Name, err))
	}
	return errors.Join(errs...)
}

// ReadyEndpoints counts the ready endpoints of fn's Service (its
// EndpointSlices, as kube-proxy sees them).
func ReadyEndpoints(ctx context.Context, cs kubernetes.Interface, fn Function) (int, error) {
	sl, err := cs.DiscoveryV1().EndpointSlices(fn.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + fn.Name,
	})
	if err != nil {
		return 0, fmt.Errorf("list endpoint slices of %s/%s: %w", fn.Namespace, fn.Name, err)
	}
	n := 0
	for _, s := range sl.Items {
		for _, e := range s.Endpoints {
			if e.Conditions.Ready == nil || *e.Conditions.Ready {
				n++
			}
		}
	}
	return n, nil
}

// WaitReady waits until fn's Deployment has replicas updated, available
// pods and its Service as many ready endpoints (0 waits for none left).
func WaitReady(ctx context.Context, cs kubernetes.Interface, fn Function, replicas int32) error {
	var last string
	for {
		d, err := cs.AppsV1().Deployments(fn.Namespace).Get(ctx, fn.Deployment, metav1.GetOptions{})
		if err == nil {
			n, eerr := ReadyEndpoints(ctx, cs, fn)
			st := d.Status
			last = fmt.Sprintf("replicas %d, updated %d, available %d, ready endpoints %d (%v)", st.Replicas, st.UpdatedReplicas, st.AvailableReplicas, n, eerr)
			if eerr == nil && deploymentDone(d, replicas) && n == int(replicas) {
				return nil
			}
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("function %q: waiting for %d ready replicas: %w (last: %s)", fn.Name, replicas, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func deploymentDone(d *appsv1.Deployment, replicas int32) bool {
	st := d.Status
	return st.ObservedGeneration >= d.Generation && st.UpdatedReplicas == replicas &&
		st.AvailableReplicas == replicas && st.Replicas == replicas
}

// NodesOf returns the nodes fn's running pods are on, pod name → node.
func NodesOf(ctx context.Context, cs kubernetes.Interface, fn Function) (map[string]string, error) {
	pods, err := cs.CoreV1().Pods(fn.Namespace).List(ctx, metav1.ListOptions{LabelSelector: fn.Selector()})
	if err != nil {
		return nil, fmt.Errorf("list pods of %q: %w", fn.Name, err)
	}
	out := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			out[p.Name] = p.Spec.NodeName
		}
	}
	return out, nil
}

// NewClient connects to the cluster of a kubeconfig file.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %q: %w", kubeconfig, err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %q: %w", kubeconfig, err)
	}
	return cs, nil
}
