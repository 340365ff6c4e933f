package orchestrator

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the orchestrator's Prometheus metrics. They are registered on
// the registerer the daemon passes; nothing is registered globally.
type Metrics struct {
	stages      *prometheus.HistogramVec
	invocations *prometheus.CounterVec
	instances   *prometheus.GaugeVec
	fallbacks   *prometheus.CounterVec
	exits       *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them on reg (nil: not
// registered, useful in tests).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		stages: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "vhive",
			Name:      "coldstart_stage_seconds",
			Help:      "Duration of each cold-start stage (GetImage, CreateSandbox, StartSandbox, RestoreSandbox, ConnectFuncClient, FuncInvocation, Total).",
			Buckets:   prometheus.ExponentialBuckets(50e-6, 2, 18), // 50µs .. ~6.5s
		}, []string{"function", "mode", "stage"}),
		invocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive",
			Name:      "invocations_total",
			Help:      "Invocations by function and kind: cold, warm; function_error (the function answered with an error status; its instance stays), instance_failure (the instance died, did not answer or could not start), oom (killed at its memory limit), error (anything else: queue timeout, cancelled, not deployed).",
		}, []string{"function", "kind"}),
		instances: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "vhive",
			Name:      "instances",
			Help:      "Live instances per function.",
		}, []string{"function"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive",
			Name:      "snapshot_fallbacks_total",
			Help:      "Cold starts that could not use a snapshot and booted instead, by reason.",
		}, []string{"function", "reason"}),
		exits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive",
			Name:      "instance_exits_total",
			Help:      "Instances that ended on their own (not stopped by vhive), by reason: oom (killed at the memory limit) or crash.",
		}, []string{"function", "reason"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.stages, m.invocations, m.instances, m.fallbacks, m.exits} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *Metrics) observeStages(function, mode string, stages []Stage) {
	for _, s := range stages {
		m.stages.WithLabelValues(function, mode, s.Name).Observe(s.Duration.Seconds())
	}
}

func (m *Metrics) invocation(function, kind string) {
	m.invocations.WithLabelValues(function, kind).Inc()
}

func (m *Metrics) setInstances(function string, n int) {
	m.instances.WithLabelValues(function).Set(float64(n))
}

func (m *Metrics) fallback(function, reason string) {
	m.fallbacks.WithLabelValues(function, reason).Inc()
}

func (m *Metrics) instanceExit(function, reason string) {
	m.exits.WithLabelValues(function, reason).Inc()
}

func (m *Metrics) forget(function string) {
	m.instances.DeleteLabelValues(function)
}

// Stage is one named, timed step of a cold start.
type Stage struct {
	Name     string
	Duration time.Duration
}
