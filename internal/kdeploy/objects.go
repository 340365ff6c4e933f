package kdeploy

import (
	"fmt"
	"maps"
	"strconv"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Ports of a function pod's queue-proxy and of its Service.
const (
	QueueProxyPort  = 8012 // what the Service targets (Knative's http port)
	QueueProxyAdmin = 9091 // queue-proxy's Prometheus metrics
	ServicePort     = 80
	UserContainer   = "user-container"
	QueueProxy      = "queue-proxy"
)

// ObjectOptions shape the objects of one function.
type ObjectOptions struct {
	// Namespace of the objects (default "default").
	Namespace string
	// QueueProxyImage is the image of the queue-proxy container
	// (vhive-queue-proxy, from functions/build). Required.
	QueueProxyImage string
	// Replicas when the template has no min-scale annotation; nil means 1.
	Replicas *int32
	// TolerationSeconds of the not-ready and unreachable NoExecute
	// tolerations: how long a function pod stays bound to a failed node
	// before it is evicted and recreated elsewhere (default 5; Kubernetes'
	// own default is 300).
	TolerationSeconds int64
	// TerminationGrace is the pods' terminationGracePeriodSeconds (default 10).
	TerminationGrace int64
	// NoSpread drops the topology spread constraint that places a
	// function's pods on different nodes when it can.
	NoSpread bool
}

func (o ObjectOptions) withDefaults() (ObjectOptions, error) {
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	if o.QueueProxyImage == "" {
		return o, fmt.Errorf("no queue-proxy image (the image of vhive-queue-proxy, e.g. built by tools/mkimage)")
	}
	if o.TolerationSeconds == 0 {
		o.TolerationSeconds = 5
	}
	if o.TolerationSeconds < 0 {
		return o, fmt.Errorf("toleration seconds %d is negative", o.TolerationSeconds)
	}
	if o.TerminationGrace == 0 {
		o.TerminationGrace = 10
	}
	if o.Replicas != nil && *o.Replicas < 0 {
		return o, fmt.Errorf("replicas %d is negative", *o.Replicas)
	}
	return o, nil
}

// RevisionName is the name of a function's (only) revision, as Knative
// names the first one.
func RevisionName(function string) string { return function + "-00001" }

// DeploymentName is the name of a function's Deployment (Knative's).
func DeploymentName(function string) string { return RevisionName(function) + "-deployment" }

// Objects turns the Knative Service svc, deployed as function name, into
// what Knative would run for its revision: a Deployment of
// revision-shaped pods (user-container + queue-proxy) and a ClusterIP
// Service in front of the queue-proxies.
func Objects(svc *Service, name string, o ObjectOptions) (*appsv1.Deployment, *corev1.Service, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, nil, err
	}
	// The revision name must fit a label value (63).
	if errs := validation.IsDNS1035Label(RevisionName(name)); len(errs) > 0 {
		return nil, nil, fmt.Errorf("function name %q: %v", name, errs)
	}
	replicas := int32(1)
	if o.Replicas != nil {
		replicas = *o.Replicas
	}
	if n, err := svc.minScale(); err != nil {
		return nil, nil, err
	} else if n >= 0 {
		replicas = n
	}
	rev := RevisionName(name)
	labels := map[string]string{
		LabelService: name, LabelConfig: name, LabelRevision: rev, LabelManaged: ManagedBy,
	}
	podLabels := maps.Clone(svc.Spec.Template.Metadata.Labels)
	if podLabels == nil {
		podLabels = map[string]string{}
	}
	maps.Copy(podLabels, labels)
	selector := map[string]string{LabelRevision: rev}

	spec := *svc.Spec.Template.Spec.PodSpec.DeepCopy()
	uc := spec.Containers[0]
	uc.Name = UserContainer
	// The function listens in its vhive sandbox, not in the pod; Knative
	// gives the user-container's port to the queue-proxy and sets PORT.
	port := strconv.Itoa(int(containerPort(uc)))
	uc.Ports = nil
	uc.Env = setEnv(uc.Env, "PORT", port)
	uc.Env = setEnv(uc.Env, EnvRevision, rev)
	uc.Env = setEnv(uc.Env, "K_SERVICE", name)
	uc.Env = setEnv(uc.Env, "K_CONFIGURATION", name)
	if envOf(uc, EnvGuestPort) == "" {
		uc.Env = setEnv(uc.Env, EnvGuestPort, port)
	}
	// Kubelet's probes of the user-container would go to the pod's network,
	// where nothing of the function listens; the queue-proxy probes it.
	uc.ReadinessProbe, uc.LivenessProbe, uc.StartupProbe = nil, nil, nil

	qp := corev1.Container{
		Name:  QueueProxy,
		Image: o.QueueProxyImage,
		Args: []string{
			"-listen", ":" + strconv.Itoa(QueueProxyPort),
			"-metrics", ":" + strconv.Itoa(QueueProxyAdmin),
		},
		Ports: []corev1.ContainerPort{
			{Name: "h2c", ContainerPort: QueueProxyPort, Protocol: corev1.ProtocolTCP},
			{Name: "metrics", ContainerPort: QueueProxyAdmin, Protocol: corev1.ProtocolTCP},
		},
		ReadinessProbe: &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: "/", Port: intstr.FromInt32(QueueProxyPort),
				HTTPHeaders: []corev1.HTTPHeader{{Name: "K-Network-Probe", Value: "queue"}},
			}},
			PeriodSeconds: 1, TimeoutSeconds: 1, FailureThreshold: 1, SuccessThreshold: 1,
		},
		ImagePullPolicy: corev1.PullIfNotPresent,
	}
	spec.Containers = []corev1.Container{uc, qp}
	grace := o.TerminationGrace
	spec.TerminationGracePeriodSeconds = &grace
	ts := o.TolerationSeconds
	for _, key := range []string{corev1.TaintNodeNotReady, corev1.TaintNodeUnreachable} {
		spec.Tolerations = append(spec.Tolerations, corev1.Toleration{
			Key: key, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: &ts,
		})
	}
	if !o.NoSpread {
		spec.TopologySpreadConstraints = append(spec.TopologySpreadConstraints, corev1.TopologySpreadConstraint{
			MaxSkew: 1, TopologyKey: corev1.LabelHostname, WhenUnsatisfiable: corev1.ScheduleAnyway,
			LabelSelector: &metav1.LabelSelector{MatchLabels: selector},
		})
	}

	meta := func(n string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: n, Namespace: o.Namespace, Labels: maps.Clone(labels),
			Annotations: maps.Clone(svc.Metadata.Annotations)}
	}
	dep := &appsv1.Deployment{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
		ObjectMeta: meta(DeploymentName(name)),
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: selector},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: podLabels, Annotations: maps.Clone(svc.Spec.Template.Metadata.Annotations)},
				Spec:       spec,
			},
		},
	}
	h2c := "kubernetes.io/h2c"
	s := &corev1.Service{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
		ObjectMeta: meta(name),
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: selector,
			Ports: []corev1.ServicePort{{
				Name: "h2c", Port: ServicePort, TargetPort: intstr.FromInt32(QueueProxyPort),
				Protocol: corev1.ProtocolTCP, AppProtocol: &h2c,
			}},
		},
	}
	return dep, s, nil
}

// containerPort is the user-container's declared port, else GUEST_PORT,
// else 50051 (vHive's function port).
func containerPort(c corev1.Container) int32 {
	if len(c.Ports) > 0 && c.Ports[0].ContainerPort > 0 {
		return c.Ports[0].ContainerPort
	}
	if p, err := strconv.Atoi(envOf(c, EnvGuestPort)); err == nil {
		return int32(p)
	}
	return 50051
}

func setEnv(env []corev1.EnvVar, name, value string) []corev1.EnvVar {
	for i := range env {
		if env[i].Name == name {
			env[i].Value, env[i].ValueFrom = value, nil
			return env
		}
	}
	return append(env, corev1.EnvVar{Name: name, Value: value})
}
