package invoker

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	hwpb "vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/bench/stats"
	"vhive.dev/vhive/internal/orchestrator"
)

// ColdStartHeader is the response header or trailer the vhive gateway sets
// to "true" when a request was served by a cold start.
const ColdStartHeader = "x-vhive-cold-start"

// DefaultPayload is the HelloRequest name vSwarm's invoker sends.
const DefaultPayload = "Invoke relay"

// Config configures Run.
type Config struct {
	Endpoints []Endpoint
	// RPS is the target rate in requests per second (> 0).
	RPS float64
	// Duration of the measured phase (> 0).
	Duration time.Duration
	// Warmup runs the same load for this long first; its requests are
	// recorded but excluded from the figures.
	Warmup time.Duration
	// Port is dialled as hostname:port when Addr is empty (vSwarm -port).
	Port int
	// Addr, when set, is dialled for every endpoint instead of
	// hostname:port, and the endpoint's hostname is sent as the :authority
	// header (how an ingress or the vhive gateway routes).
	Addr string
	// ConnPerRequest dials a new connection for every request and closes it
	// after the reply, as vSwarm's invoker does, so that a Service's
	// per-connection load balancing (kube-proxy) spreads the requests over
	// its pods. The latency then includes the connection set-up.
	ConnPerRequest bool
	// Timeout bounds each request (vSwarm -grpcTimeout; default 30s).
	Timeout time.Duration
	// Payload is the HelloRequest name (default DefaultPayload).
	Payload string
	// Method, when set, is the gRPC method called instead of SayHello
	// ("/pkg.Service/Method"), with Request, the serialized request
	// message, sent as it is.
	Method  string
	Request []byte
	// HTTP, when set, makes every request this HTTP request (to HTTP
	// functions; the endpoint's hostname is the Host header).
	HTTP *HTTPRequest
	// OnIssue, if set, is called by the issuing goroutine after each request
	// is issued (e.g. to advance a progress bar). It must not block.
	OnIssue func()
	Logger  *slog.Logger
}

// HTTPRequest is the request sent to HTTP functions.
type HTTPRequest struct {
	Method string // default GET, or POST with a body
	Path   string // default "/"
	Header http.Header
	Body   []byte
}

func (c *Config) setDefaults() error {
	if len(c.Endpoints) == 0 {
		return errors.New("no endpoints to invoke")
	}
	if !(c.RPS > 0) {
		return fmt.Errorf("rps %v: want a positive rate", c.RPS)
	}
	if c.Duration <= 0 {
		return fmt.Errorf("duration %v: want a positive time", c.Duration)
	}
	if c.Warmup < 0 {
		return fmt.Errorf("warmup %v: want zero or more", c.Warmup)
	}
	needPort := false
	for _, ep := range c.Endpoints {
		needPort = needPort || ep.Address == ""
	}
	if c.Addr == "" && needPort && (c.Port < 1 || c.Port > 65535) {
		return fmt.Errorf("port %d: want 1-65535", c.Port)
	}
	if c.Addr != "" {
		if _, _, err := net.SplitHostPort(c.Addr); err != nil {
			return fmt.Errorf("addr %q: want host:port: %w", c.Addr, err)
		}
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if c.Payload == "" {
		c.Payload = DefaultPayload
	}
	if c.Method != "" && c.HTTP != nil {
		return errors.New("a gRPC method and an HTTP request: give one")
	}
	if c.Method != "" {
		m, err := orchestrator.NormalizeMethod(c.Method)
		if err != nil {
			return err
		}
		c.Method = m
	}
	if c.HTTP != nil {
		if c.HTTP.Path == "" {
			c.HTTP.Path = "/"
		}
		if !strings.HasPrefix(c.HTTP.Path, "/") {
			return fmt.Errorf("HTTP path %q: want an absolute path", c.HTTP.Path)
		}
		if c.HTTP.Method == "" {
			c.HTTP.Method = http.MethodGet
			if len(c.HTTP.Body) > 0 {
				c.HTTP.Method = http.MethodPost
			}
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Interval is the time between two requests at rps.
func Interval(rps float64) time.Duration {
	return time.Duration(float64(time.Second) / rps)
}

// Record is one request.
type Record struct {
	Seq      int    `json:"seq"`
	Endpoint string `json:"endpoint"`
	// Scheduled is when the open-loop schedule wanted the request issued;
	// Start is when it was.
	Scheduled time.Time     `json:"scheduled"`
	Start     time.Time     `json:"start"`
	Latency   time.Duration `json:"latency"`
	Code      codes.Code    `json:"code"`
	Error     string        `json:"error,omitempty"`
	Cold      bool          `json:"cold"`
	Warmup    bool          `json:"warmup"`
}

// Result of a run.
type Result struct {
	Target float64 `json:"target_rps"`
	// Issue is how long the measured issuing phase took (after warm-up).
	Issue   time.Duration `json:"issue_duration"`
	Records []Record      `json:"records"` // ordered by Seq
}

// Run drives the endpoints open-loop: a request is issued on every tick of
// a ticker at 1/RPS (the first at once), round-robin over the endpoints, in
// its own goroutine, whatever the state of earlier requests. After Warmup
// + Duration no more requests are issued and Run waits for those in flight
// (each bounded by Timeout). Cancelling ctx stops issuing and cancels the
// requests in flight; Run still returns what it recorded, with ctx.Err().
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	// An endpoint is dialled at cfg.Addr, else at its own Address, else at
	// hostname:port; with an address its hostname is the :authority.
	type dialTarget struct {
		target string
		opts   []grpc.DialOption
	}
	targets := make([]dialTarget, len(cfg.Endpoints))
	for i, ep := range cfg.Endpoints {
		t := dialTarget{
			target: net.JoinHostPort(ep.Hostname, strconv.Itoa(cfg.Port)),
			opts:   []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
		}
		if addr := cmp.Or(cfg.Addr, ep.Address); addr != "" {
			t.target = addr
			t.opts = append(t.opts, grpc.WithAuthority(ep.Hostname))
		}
		targets[i] = t
	}
	conns := map[string]*grpc.ClientConn{}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	clients := make([]*grpc.ClientConn, len(cfg.Endpoints))
	for i, ep := range cfg.Endpoints {
		t := targets[i]
		key := t.target + "|" + ep.Hostname
		conn, ok := conns[key]
		if !ok {
			var err error
			if conn, err = grpc.NewClient("passthrough:///"+t.target, t.opts...); err != nil {
				return nil, fmt.Errorf("endpoint %q: connect to %s: %w", ep.Hostname, t.target, err)
			}
			if cfg.ConnPerRequest {
				conn.Close() // the target is valid; each request dials its own
			} else {
				conns[key] = conn
			}
		}
		clients[i] = conn
	}
	httpClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableKeepAlives: cfg.ConnPerRequest}}
	defer httpClient.CloseIdleConnections()

	res := &Result{Target: cfg.RPS}
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	issue := func(seq int, warm bool, sched time.Time) {
		ep := cfg.Endpoints[seq%len(cfg.Endpoints)]
		client := clients[seq%len(cfg.Endpoints)]
		t := targets[seq%len(cfg.Endpoints)]
		wg.Go(func() {
			if cfg.HTTP != nil {
				rec := callHTTP(ctx, httpClient, cfg, seq, ep.Hostname, t.target)
				rec.Warmup = warm
				rec.Scheduled = sched
				mu.Lock()
				res.Records = append(res.Records, rec)
				mu.Unlock()
				return
			}
			c := client
			var conn *grpc.ClientConn
			if cfg.ConnPerRequest {
				var err error
				if conn, err = grpc.NewClient("passthrough:///"+t.target, t.opts...); err == nil {
					c = conn
				}
			}
			rec := call(ctx, c, cfg, seq, ep.Hostname)
			if conn != nil {
				conn.Close()
			}
			rec.Warmup = warm
			rec.Scheduled = sched
			mu.Lock()
			res.Records = append(res.Records, rec)
			mu.Unlock()
		})
		if cfg.OnIssue != nil {
			cfg.OnIssue()
		}
	}

	// Request k is due at start + k·interval. Every tick issues the
	// requests that are due (normally exactly one); if the process fell
	// behind (a late tick; time.Ticker drops ticks it could not deliver)
	// the overdue ones are issued at once, so the rate holds over the run.
	interval := Interval(cfg.RPS)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	start := time.Now()
	warmEnd := start.Add(cfg.Warmup)
	end := warmEnd.Add(cfg.Duration)
	due := func(k int) time.Time { return start.Add(time.Duration(k) * interval) }
	seq := 0
	var err error
loop:
	for {
		now := time.Now()
		for ; due(seq).Before(end) && !due(seq).After(now); seq++ {
			sched := due(seq)
			issue(seq, sched.Before(warmEnd), sched)
		}
		if !due(seq).Before(end) {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
			break loop
		case <-tick.C:
		}
	}
	// The measured window: the whole planned duration, or up to the
	// interruption.
	res.Issue = cfg.Duration
	if err != nil {
		res.Issue = max(time.Since(warmEnd), 0)
	}
	wg.Wait()
	sortRecords(res.Records)
	cfg.Logger.Info("invoker finished", "issued", seq, "target_rps", cfg.RPS)
	return res, err
}

func call(ctx context.Context, conn *grpc.ClientConn, cfg Config, seq int, host string) Record {
	rec := Record{Seq: seq, Endpoint: host, Start: time.Now()}
	cctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	var header, trailer metadata.MD
	var err error
	if cfg.Method != "" {
		req, reply := orchestrator.Frame(cfg.Request), orchestrator.Frame(nil)
		err = conn.Invoke(cctx, cfg.Method, &req, &reply, grpc.ForceCodecV2(orchestrator.RawCodec{}), grpc.Header(&header), grpc.Trailer(&trailer))
	} else {
		_, err = hwpb.NewGreeterClient(conn).SayHello(cctx, &hwpb.HelloRequest{Name: cfg.Payload}, grpc.Header(&header), grpc.Trailer(&trailer))
	}
	rec.Latency = time.Since(rec.Start)
	rec.Code = status.Code(err)
	if err != nil {
		rec.Error = err.Error()
	}
	for _, md := range []metadata.MD{header, trailer} {
		for _, v := range md.Get(ColdStartHeader) {
			if strings.EqualFold(v, "true") {
				rec.Cold = true
			}
		}
	}
	return rec
}

// callHTTP sends cfg.HTTP to an HTTP function at target (host:port), with
// host as the Host header. A status of 400 and above counts as failed, with
// the gRPC code an HTTP status maps to.
func callHTTP(ctx context.Context, client *http.Client, cfg Config, seq int, host, target string) Record {
	rec := Record{Seq: seq, Endpoint: host, Start: time.Now()}
	cctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, cfg.HTTP.Method, "http://"+target+cfg.HTTP.Path, bytes.NewReader(cfg.HTTP.Body))
	if err == nil {
		req.Host = host
		for k, vs := range cfg.HTTP.Header {
			req.Header[k] = vs
		}
		var resp *http.Response
		if resp, err = client.Do(req); err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			rec.Cold = strings.EqualFold(resp.Header.Get(ColdStartHeader), "true")
			if err == nil && resp.StatusCode >= 400 {
				rec.Code = httpCode(resp.StatusCode)
				rec.Error = "HTTP " + resp.Status
			}
		}
	}
	rec.Latency = time.Since(rec.Start)
	if err != nil {
		rec.Code = status.Code(status.FromContextError(err).Err())
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			rec.Code = codes.Unavailable
		}
		rec.Error = err.Error()
	}
	return rec
}

// httpCode is the gRPC code of an HTTP error status (as gRPC's own HTTP
// mapping does).
func httpCode(s int) codes.Code {
	switch s {
	case http.StatusBadRequest:
		return codes.Internal
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusNotFound:
		return codes.Unimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return codes.Unavailable
	}
	return codes.Unknown
}

func sortRecords(rs []Record) {
	slices.SortFunc(rs, func(a, b Record) int { return a.Seq - b.Seq })
}

// Summary are the figures of the measured (non-warm-up) requests.
type Summary struct {
	Issued    int            `json:"issued"`
	Completed int            `json:"completed"` // replied OK
	Failed    int            `json:"failed"`
	Errors    map[string]int `json:"errors,omitempty"` // by gRPC code name
	ColdStart int            `json:"cold_starts"`
	TargetRPS float64        `json:"target_rps"`
	IssuedRPS float64        `json:"issued_rps"` // issued / issuing time
	RealRPS   float64        `json:"real_rps"`   // completed / issuing time (vSwarm's "real RPS")
	Latency   stats.Summary  `json:"latency_us"` // of completed requests, µs
	Warmup    int            `json:"warmup_requests"`
	// MaxIssueLag is the largest delay between a request's scheduled and
	// actual issue time: how well the generator kept its schedule.
	MaxIssueLag time.Duration `json:"max_issue_lag"`
}

// Summarize computes the figures of r, excluding warm-up requests.
func (r *Result) Summarize() Summary {
	s := Summary{TargetRPS: r.Target, Errors: map[string]int{}}
	var lat []float64
	for _, rec := range r.Records {
		if rec.Warmup {
			s.Warmup++
			continue
		}
		s.Issued++
		if lag := rec.Start.Sub(rec.Scheduled); lag > s.MaxIssueLag {
			s.MaxIssueLag = lag
		}
		if rec.Code == codes.OK {
			s.Completed++
			lat = append(lat, float64(rec.Latency.Microseconds()))
		} else {
			s.Failed++
			s.Errors[rec.Code.String()]++
		}
		if rec.Cold {
			s.ColdStart++
		}
	}
	if secs := r.Issue.Seconds(); secs > 0 {
		s.IssuedRPS = float64(s.Issued) / secs
		s.RealRPS = float64(s.Completed) / secs
	}
	s.Latency = stats.Summarize(lat)
	return s
}

// Endpoints lists the endpoints of r's records, in order of first use.
func (r *Result) Endpoints() []string {
	var out []string
	seen := map[string]bool{}
	for _, rec := range r.Records {
		if !seen[rec.Endpoint] {
			seen[rec.Endpoint] = true
			out = append(out, rec.Endpoint)
		}
	}
	return out
}

// ForEndpoint is the part of r whose requests went to the endpoint host,
// e.g. to summarize one function of a run over several. Its target rate is
// r's divided evenly over r's endpoints (round-robin).
func (r *Result) ForEndpoint(host string) *Result {
	out := &Result{Issue: r.Issue}
	if n := len(r.Endpoints()); n > 0 {
		out.Target = r.Target / float64(n)
	}
	for _, rec := range r.Records {
		if rec.Endpoint == host {
			out.Records = append(out.Records, rec)
		}
	}
	return out
}
