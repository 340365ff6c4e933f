// Package queueproxy is vhive's stand-in for Knative's queue-proxy: the
// sidecar of every function pod that the pod's Service targets. It relays
// each request (HTTP/2 cleartext, i.e. gRPC, or HTTP/1.1) to the function
// that vhive's CRI started for the pod's user-container, at
// GUEST_ADDR:GUEST_PORT, which the CRI adds to this container's env.
//
// Like Knative's, it answers the kubelet's readiness probe itself: a request
// carrying the header "K-Network-Probe: queue" is answered 200 "queue" only
// while the function accepts TCP connections and the proxy is not draining,
// 503 otherwise, so a pod joins its Service's endpoints only once its
// function is reachable, and leaves them as soon as the proxy shuts down.
//
// It counts what it relays (Prometheus, on its own registry, served on the
// metrics listener): requests by gRPC status (or HTTP status for non-gRPC
// requests), requests in flight and relay latency.
//
// Shutdown (Run's context cancelled, e.g. on SIGTERM from the kubelet):
// probes fail at once, the proxy keeps serving for DrainWait (the time the
// endpoints need to drop the pod), then stops accepting and waits up to
// DrainTimeout for the requests in flight.
package queueproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ProbeHeader is the header of readiness probes (Knative's name); the value
// ProbeValue asks the proxy about itself and its function.
const (
	ProbeHeader = "K-Network-Probe"
	ProbeValue  = "queue"
)

// Config configures a Proxy.
type Config struct {
	// Upstream is the function's host:port (GUEST_ADDR:GUEST_PORT). Required.
	Upstream string
	// DialTimeout bounds the readiness probe's dial and each relay's
	// connection set-up (default 1s).
	DialTimeout time.Duration
	// DrainWait is how long the proxy keeps serving after shutdown begins,
	// while failing probes (default 0).
	DrainWait time.Duration
	// DrainTimeout bounds the wait for requests in flight at shutdown
	// (default 30s).
	DrainTimeout time.Duration
	Logger       *slog.Logger
}

// Proxy relays requests to one function. It is an http.Handler.
type Proxy struct {
	cfg      Config
	rp       *httputil.ReverseProxy
	draining atomic.Bool
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	inflight prometheus.Gauge
	latency  prometheus.Histogram
	probes   *prometheus.CounterVec
}

// New validates cfg and returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	host, port, err := net.SplitHostPort(cfg.Upstream)
	if err != nil || host == "" {
		return nil, fmt.Errorf("queue-proxy: upstream %q: want host:port (GUEST_ADDR and GUEST_PORT)", cfg.Upstream)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, fmt.Errorf("queue-proxy: upstream %q: port %q is not 1-65535", cfg.Upstream, port)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = time.Second
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 30 * time.Second
	}
	if cfg.DrainWait < 0 {
		return nil, fmt.Errorf("queue-proxy: drain wait %v is negative", cfg.DrainWait)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{cfg: cfg, reg: prometheus.NewRegistry()}
	p.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vhive", Subsystem: "queue_proxy", Name: "requests_total",
		Help: "Requests relayed, by gRPC status code name (or HTTP status for non-gRPC requests).",
	}, []string{"code"})
	p.inflight = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "vhive", Subsystem: "queue_proxy", Name: "requests_in_flight",
		Help: "Requests being relayed.",
	})
	p.latency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "vhive", Subsystem: "queue_proxy", Name: "request_seconds",
		Help:    "Time from a request's arrival to the end of its relayed reply.",
		Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18),
	})
	p.probes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vhive", Subsystem: "queue_proxy", Name: "probes_total",
		Help: "Readiness probes answered, by result (ready, unreachable, draining).",
	}, []string{"result"})
	p.reg.MustRegister(p.requests, p.inflight, p.latency, p.probes)

	target := &url.URL{Scheme: "http", Host: cfg.Upstream}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: cfg.DialTimeout}).DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
	}
	// The function speaks HTTP/2 without TLS (gRPC), so the transport does
	// too: prior knowledge, no upgrade.
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host
		},
		Transport:     tr,
		FlushInterval: -1, // stream replies (gRPC) as they come
		ErrorHandler:  p.relayError,
		ErrorLog:      slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
	return p, nil
}

// Registry is the proxy's own metrics registry.
func (p *Proxy) Registry() *prometheus.Registry { return p.reg }

func isGRPC(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}

// relayError answers a request the function could not be reached for: as a
// gRPC UNAVAILABLE status for gRPC requests, 502 otherwise.
func (p *Proxy) relayError(w http.ResponseWriter, r *http.Request, err error) {
	p.cfg.Logger.Warn("relay failed", "path", r.URL.Path, "upstream", p.cfg.Upstream, "err", err)
	if isGRPC(r) {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", "14") // UNAVAILABLE
		w.Header().Set("Grpc-Message", "queue-proxy: function unreachable")
		w.WriteHeader(http.StatusOK)
		return
	}
	http.Error(w, "queue-proxy: function unreachable: "+err.Error(), http.StatusBadGateway)
}

// Ready reports whether the function accepts connections and the proxy is
// not draining; the error says why not.
func (p *Proxy) Ready(ctx context.Context) error {
	if p.draining.Load() {
		return errDraining
	}
	d := net.Dialer{Timeout: p.cfg.DialTimeout}
	c, err := d.DialContext(ctx, "tcp", p.cfg.Upstream)
	if err != nil {
		return fmt.Errorf("function at %s: %w", p.cfg.Upstream, err)
	}
	return c.Close()
}

var errDraining = errors.New("draining")

func (p *Proxy) probe(w http.ResponseWriter, r *http.Request) {
	err := p.Ready(r.Context())
	switch {
	case err == nil:
		p.probes.WithLabelValues("ready").Inc()
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte(ProbeValue))
	case errors.Is(err, errDraining):
		p.probes.WithLabelValues("draining").Inc()
		http.Error(w, "queue-proxy: draining", http.StatusServiceUnavailable)
	default:
		p.probes.WithLabelValues("unreachable").Inc()
		http.Error(w, "queue-proxy: "+err.Error(), http.StatusServiceUnavailable)
	}
}

// ServeHTTP answers probes and relays everything else to the function.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(ProbeHeader) == ProbeValue {
		p.probe(w, r)
		return
	}
	start := time.Now()
	p.inflight.Inc()
	rec := &recorder{ResponseWriter: w}
	p.rp.ServeHTTP(rec, r)
	p.inflight.Dec()
	p.latency.Observe(time.Since(start).Seconds())
	p.requests.WithLabelValues(rec.code(isGRPC(r))).Inc()
}

// grpcCodes are the names of gRPC status codes 0-16 (as grpc-go spells
// them, matching the invoker's report).
var grpcCodes = []string{"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
	"AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}

// recorder remembers the status a relayed reply carried.
type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Flush and Unwrap keep streaming working through the wrapper.
func (r *recorder) Flush() { _ = http.NewResponseController(r.ResponseWriter).Flush() }

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// code is the gRPC status name of a gRPC reply (from its trailers, or its
// headers for a trailers-only reply), else the HTTP status.
func (r *recorder) code(grpcReq bool) string {
	if grpcReq {
		h := r.Header()
		s := h.Get("Grpc-Status")
		if s == "" {
			s = h.Get(http.TrailerPrefix + "Grpc-Status")
		}
		if n, err := strconv.Atoi(s); err == nil && n >= 0 && n < len(grpcCodes) {
			return grpcCodes[n]
		}
		if s != "" {
			return "Code(" + s + ")"
		}
		if r.status != 0 && r.status != http.StatusOK {
			return "HTTP" + strconv.Itoa(r.status)
		}
		return "Unknown"
	}
	if r.status == 0 {
		return "HTTP200"
	}
	return "HTTP" + strconv.Itoa(r.status)
}

// Run serves the proxy on lis and, if metrics is not nil, /metrics on it,
// until ctx is cancelled; then it drains (see the package doc) and returns.
// It closes both listeners.
func (p *Proxy) Run(ctx context.Context, lis, metrics net.Listener) error {
	srv := &http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)            // kubelet's probes, HTTP/1 clients
	srv.Protocols.SetUnencryptedHTTP2(true) // gRPC with prior knowledge
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(lis) }()
	var msrv *http.Server
	if metrics != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{Registry: p.reg}))
		msrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- msrv.Serve(metrics) }()
	}
	p.cfg.Logger.Info("queue-proxy serving", "addr", lis.Addr().String(), "upstream", p.cfg.Upstream)
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	p.draining.Store(true)
	if serveErr == nil && p.cfg.DrainWait > 0 {
		p.cfg.Logger.Info("queue-proxy draining", "wait", p.cfg.DrainWait)
		t := time.NewTimer(p.cfg.DrainWait)
		select {
		case <-t.C:
		case serveErr = <-errc:
			t.Stop()
		}
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.DrainTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if msrv != nil {
		_ = msrv.Close()
	}
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) {
		return fmt.Errorf("queue-proxy: serve: %w", serveErr)
	}
	if err != nil {
		return fmt.Errorf("queue-proxy: drain requests in flight: %w", err)
	}
	p.cfg.Logger.Info("queue-proxy stopped")
	return nil
}
