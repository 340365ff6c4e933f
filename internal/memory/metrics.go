package memory

import (
	"fmt"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// maxLatencySamples bounds the per-fault latency samples kept per restore.
const maxLatencySamples = 1 << 16

// Stats is what one restore measured, with vHive's names. Durations are
// wall time in the manager; page counts are in pages of the regions' page
// size.
type Stats struct {
	// FetchState: reading and verifying the WS file (prefetch), from the
	// start of the restore until the last chunk was verified. It overlaps
	// the sandbox's start-up and InstallWS.
	FetchState time.Duration
	// InstallWS: installing the WS, from the handshake until the wake
	// after the last chunk (UFFDIO_COPY per run and chunk, UFFDIO_WAKE);
	// with RestoreConfig.EarlyResume it runs while the sandbox does.
	InstallWS time.Duration
	// PrefetchWS: from the start of the restore until the last chunk was
	// installed (or the install stopped): the whole prefetch, overlapped.
	PrefetchWS time.Duration
	// InstallBusy: the part of InstallWS spent installing (the rest is
	// waiting for chunks still being read or verified).
	InstallBusy time.Duration
	// WSWaits: faults on working-set pages not installed yet, which waited
	// for their chunk (EarlyResume); not counted in Faults or Unique.
	WSWaits int64
	// DirectRead: the WS file was read with O_DIRECT.
	DirectRead bool
	// SharedFetch: the restore joined a read of the same WS file already
	// in progress for a simultaneous restore (it read nothing itself).
	SharedFetch bool
	// ServeUnique: total service time of the faults served lazily.
	ServeUnique time.Duration

	// RecPages, RecRegions: pages and contiguous runs of the working set
	// (recorded by FinishRecord in record mode, installed in prefetch).
	RecPages   int64
	RecRegions int64
	// Unique: pages served lazily on a fault (prefetch: outside the WS).
	Unique int64
	// Faults: page-fault events that found their page missing and
	// installed it (with chunks, its neighbours too: their faults never
	// happen). Lazily, one per distinct page touched (plus one each time
	// a removed page is touched again).
	Faults int64
	// DupFaults: page-fault events for a page already installed when the
	// event was handled, served with a wake only: the kernel queues one
	// event per faulting thread and per wait, so two threads faulting on
	// the same page, or a thread whose wait a signal interrupted (the
	// Go runtime's preemption) faulting again, give a page two events;
	// also a chunk neighbour's fault queued before its chunk was
	// installed. Not counted in Faults, Unique or FaultLatency, and never
	// recorded into the working set.
	DupFaults int64
	// ZeroPages: pages installed with UFFDIO_ZEROPAGE (holes of a sparse
	// memory file, pages after UFFD_EVENT_REMOVE).
	ZeroPages int64
	// Removes: UFFD_EVENT_REMOVE events.
	Removes int64
	// BytesRead: bytes read from the memory file (lazy pages) and the WS
	// file.
	BytesRead int64
	// PrefetchFallback: the WS file was unusable, the restore served lazily.
	PrefetchFallback bool

	// FaultLatency: service time of each fault (event read → page
	// installed), in fault order, at most 65536 samples.
	FaultLatency []time.Duration
}

// Percentile returns the p-th percentile (0 < p <= 100) of FaultLatency, 0
// without samples.
func (s Stats) Percentile(p float64) time.Duration {
	if len(s.FaultLatency) == 0 {
		return 0
	}
	l := slices.Clone(s.FaultLatency)
	slices.Sort(l)
	i := int(p/100*float64(len(l))+0.5) - 1
	return l[max(0, min(i, len(l)-1))]
}

// String summarises the stats on one line, latency as p50/p99.
func (s Stats) String() string {
	return fmt.Sprintf("FetchState=%v InstallWS=%v ServeUnique=%v RecPages=%d RecRegions=%d Unique=%d Faults=%d DupFaults=%d "+
		"ZeroPages=%d Removes=%d BytesRead=%d PrefetchFallback=%v FaultP50=%v FaultP99=%v",
		s.FetchState, s.InstallWS, s.ServeUnique, s.RecPages, s.RecRegions, s.Unique, s.Faults, s.DupFaults,
		s.ZeroPages, s.Removes, s.BytesRead, s.PrefetchFallback, s.Percentile(50), s.Percentile(99))
}

// Stages returns the durations under vHive's stage names, for
// sandbox.RestoreResult.Stages.
func (s Stats) Stages() map[string]time.Duration {
	return map[string]time.Duration{"FetchState": s.FetchState, "InstallWS": s.InstallWS, "ServeUnique": s.ServeUnique}
}

// Pages returns the page statistics under vHive's names, for
// sandbox.RestoreResult.Pages.
func (s Stats) Pages() map[string]int64 {
	return map[string]int64{
		"RecPages": s.RecPages, "RecRegions": s.RecRegions, "Unique": s.Unique,
		"Faults": s.Faults, "DupFaults": s.DupFaults, "ZeroPages": s.ZeroPages, "BytesRead": s.BytesRead, "WSWaits": s.WSWaits,
	}
}

// Metrics are the memory manager's Prometheus collectors. Build one with
// NewMetrics and pass it in Config; the zero value is not usable.
type Metrics struct {
	restores    *prometheus.CounterVec
	faults      *prometheus.CounterVec
	dupFaults   *prometheus.CounterVec
	unique      *prometheus.CounterVec
	bytesRead   *prometheus.CounterVec
	fallbacks   prometheus.Counter
	faultTime   *prometheus.HistogramVec
	stageTime   *prometheus.HistogramVec
	activeCount prometheus.Gauge
}

// NewMetrics creates the collectors and registers them on reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	modes := []string{"mode"}
	m := &Metrics{
		restores: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "restores_total",
			Help: "Restores served by the memory manager.",
		}, modes),
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "faults_total",
			Help: "Page-fault events that installed their missing page.",
		}, modes),
		dupFaults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "dup_faults_total",
			Help: "Page-fault events for a page already installed (another thread's or a retried fault), served with a wake.",
		}, modes),
		unique: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "unique_pages_total",
			Help: "Pages served lazily on a fault (outside the working set).",
		}, modes),
		bytesRead: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "read_bytes_total",
			Help: "Bytes read from memory files and working-set files.",
		}, modes),
		fallbacks: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "prefetch_fallbacks_total",
			Help: "Prefetch restores that served lazily because the working-set file was unusable.",
		}),
		faultTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "fault_service_seconds",
			Help:    "Time to serve one page fault (event read to page installed).",
			Buckets: prometheus.ExponentialBuckets(2e-6, 2, 16),
		}, modes),
		stageTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "stage_seconds",
			Help:    "Memory restore stages (FetchState, InstallWS).",
			Buckets: prometheus.ExponentialBuckets(1e-4, 2, 16),
		}, []string{"stage"}),
		activeCount: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "vhive", Subsystem: "memory", Name: "active_restores",
			Help: "Restores currently served.",
		}),
	}
	for _, c := range []prometheus.Collector{m.restores, m.faults, m.dupFaults, m.unique, m.bytesRead, m.fallbacks, m.faultTime, m.stageTime, m.activeCount} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register memory metrics: %w", err)
		}
	}
	return m, nil
}
