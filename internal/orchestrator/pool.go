package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/reflect/protoreflect"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/store"
)

// function is one deployed function and its pool of instances.
//
// Locking: f.mu guards every field below it. No sandbox or network call is
// made while holding it.
type function struct {
	o    *Orchestrator
	spec FunctionSpec

	mu        sync.Mutex
	instances []*instance
	starting  int  // instances being started
	waiting   int  // requests waiting for a slot
	removed   bool // no new requests
	changed   chan struct{}
	cold      uint64
	warm      uint64
	// snapshotting is set while a snapshot of this function is being
	// taken, so that only one instance is snapshotted at a time.
	snapshotting bool
	// snapshotStart is when the snapshot under way began.
	snapshotStart time.Time
	// lastCold is the Total of the function's latest cold start: how long
	// another instance would take to start, against which a request
	// weighs waiting for a snapshot under way.
	lastCold time.Duration
	// methods caches the methods resolved by server reflection.
	methods map[string]protoreflect.MethodDescriptor
	// recording is set while an instance restored in record mode has not
	// finished its recording.
	recording bool
}

type instance struct {
	id     string
	sb     sandbox.Sandbox
	conn   *grpc.ClientConn
	client helloworld.GreeterClient
	// An HTTP function's base URL and transport (nil for gRPC ones).
	url       *url.URL
	transport *http.Transport
	startMode string
	started   time.Time
	// persisted is closed once the instance's record is in the store (it
	// is written while the first request runs); a delete waits for it.
	persisted chan struct{}

	// guarded by function.mu
	inflight int
	lastUsed time.Time
	stopping bool
	// held: not available for new requests (being snapshotted).
	held bool
	// served counts successful invocations.
	served uint64
}

func newFunction(o *Orchestrator, spec FunctionSpec) *function {
	return &function{o: o, spec: spec, changed: make(chan struct{})}
}

// broadcast wakes every waiter. Caller holds f.mu.
func (f *function) broadcast() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *function) status() FunctionStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := FunctionStatus{Spec: f.spec, Instances: len(f.instances), Cold: f.cold, Warm: f.warm}
	for _, in := range f.instances {
		if in.inflight > 0 {
			st.Busy++
		}
	}
	return st
}

// freeInstance returns an instance with a free slot, preferring the busiest
// (bin packing keeps other instances idle so they can scale to zero).
// Caller holds f.mu.
func (f *function) freeInstance() *instance {
	var best *instance
	for _, in := range f.instances {
		if in.stopping || in.held || in.inflight >= f.spec.Concurrency {
			continue
		}
		if best == nil || in.inflight > best.inflight {
			best = in
		}
	}
	return best
}

// acquire returns an instance with a slot reserved for the caller. cold is
// set (with the cold start's stages) when the caller started it.
func (f *function) acquire(ctx context.Context) (in *instance, cs *coldStart, err error) {
	deadline := time.NewTimer(f.o.cfg.QueueTimeout)
	defer deadline.Stop()
	f.mu.Lock()
	for {
		if f.removed {
			f.mu.Unlock()
			return nil, nil, fmt.Errorf("%w: function %q is being removed", ErrNotFound, f.spec.Name)
		}
		if in := f.freeInstance(); in != nil {
			in.inflight++
			f.mu.Unlock()
			return in, nil, nil
		}
		// A starting instance has Concurrency-1 slots its starter does not
		// use; wait for one of those rather than start another instance.
		spare := f.starting * (f.spec.Concurrency - 1)
		total := len(f.instances) + f.starting
		// An instance being snapshotted is back within the snapshot's
		// time: wait for it rather than start another, up to the bound.
		snapWait := f.snapshotWaitLocked(time.Now())
		if snapWait <= 0 && spare <= f.waiting && total < f.spec.MaxInstances {
			f.starting++
			f.mu.Unlock()
			in, cs, err := f.start(ctx)
			f.mu.Lock()
			f.starting--
			if err != nil {
				f.broadcast()
				f.mu.Unlock()
				return nil, nil, err
			}
			if f.removed {
				f.mu.Unlock()
				f.stopInstance(context.WithoutCancel(ctx), in, "function removed during start")
				return nil, nil, fmt.Errorf("%w: function %q was removed while its instance started", ErrNotFound, f.spec.Name)
			}
			in.inflight = 1
			in.lastUsed = time.Now()
			f.instances = append(f.instances, in)
			f.o.cfg.Metrics.setInstances(f.spec.Name, len(f.instances))
			f.broadcast()
			f.mu.Unlock()
			go f.watch(in)
			return in, cs, nil
		}
		// Wait for a slot, a new instance or a failed start (or, while a
		// snapshot is taken, for the snapshot's bound to pass).
		ch := f.changed
		f.waiting++
		f.mu.Unlock()
		var snapTimer <-chan time.Time
		if snapWait > 0 {
			snapTimer = time.After(snapWait)
		}
		select {
		case <-snapTimer:
		case <-ch:
		case <-ctx.Done():
			f.mu.Lock()
			f.waiting--
			f.mu.Unlock()
			return nil, nil, fmt.Errorf("waiting for an instance of %q: %w", f.spec.Name, ctx.Err())
		case <-deadline.C:
			f.mu.Lock()
			f.waiting--
			f.mu.Unlock()
			return nil, nil, fmt.Errorf("%w: no instance of %q became free within %s (max-instances %d reached)", ErrUnavailable, f.spec.Name, f.o.cfg.QueueTimeout, f.spec.MaxInstances)
		}
		f.mu.Lock()
		f.waiting--
	}
}

// snapshotWaitLocked is how much longer a request that finds no free
// instance waits for the instance being snapshotted instead of starting
// another: until the snapshot has run for SnapshotWait or for the function's
// last cold start, whichever is shorter (waiting longer would be slower than
// starting an instance). Caller holds f.mu.
func (f *function) snapshotWaitLocked(now time.Time) time.Duration {
	if !f.snapshotting || f.o.cfg.SnapshotWait < 0 {
		return 0
	}
	held := false
	for _, in := range f.instances {
		if in.held && !in.stopping {
			held = true
			break
		}
	}
	if !held {
		return 0
	}
	bound := f.o.cfg.SnapshotWait
	if f.lastCold > 0 && f.lastCold < bound {
		bound = f.lastCold
	}
	return f.snapshotStart.Add(bound).Sub(now)
}

func (f *function) release(in *instance, ok bool) {
	f.mu.Lock()
	in.inflight--
	in.lastUsed = time.Now()
	if ok {
		in.served++
	}
	f.broadcast()
	f.mu.Unlock()
}

// call sends one request to an instance and reads its reply; cold is set
// when the request started the instance. It makes its requests with ctx,
// through which do learns whether the function answered. guest holds the
// response headers, where the sandbox may report the function's own time.
// untimed is the part of the call's time that is not the function's (a
// method's types resolved by reflection): FuncInvocation leaves it out.
type call func(ctx context.Context, in *instance, cold bool) (guest metadata.MD, untimed time.Duration, err error)

// callFor makes the call of req, checking it against the function's protocol.
func (f *function) callFor(req Request, res *Result) (call, error) {
	switch {
	case f.spec.Protocol == ProtocolHTTP:
		if req.Method != "" {
			return nil, fmt.Errorf("%w: function %q is an HTTP function: a gRPC method (%q) cannot be called on it", ErrInvalid, f.spec.Name, req.Method)
		}
		hr := req.HTTP
		if hr == nil {
			hr = &HTTPRequest{}
		}
		return httpCall(hr, req.Payload, res)
	case req.HTTP != nil:
		return nil, fmt.Errorf("%w: function %q is a gRPC function: call a method instead of sending an HTTP request", ErrInvalid, f.spec.Name)
	case req.Method == "":
		if req.JSON {
			return nil, fmt.Errorf("%w: a JSON request needs a method", ErrInvalid)
		}
		return greeterCall(req.Payload, &res.Payload), nil
	}
	return f.methodCall(req.Method, req.Payload, req.JSON, &res.Payload)
}

// greeterCall invokes vHive's helloworld.Greeter/SayHello with payload as
// the name, storing the reply's message in *reply.
func greeterCall(payload []byte, reply *[]byte) call {
	return func(ctx context.Context, in *instance, _ bool) (metadata.MD, time.Duration, error) {
		var hdr metadata.MD
		r, err := in.client.SayHello(ctx, &helloworld.HelloRequest{Name: string(payload)}, grpc.Header(&hdr))
		if err != nil {
			return hdr, 0, err
		}
		*reply = []byte(r.GetMessage())
		return hdr, 0, nil
	}
}

// do runs c on an instance (started cold if none is free) and reports the
// cold start's stages. A status the function returned comes back as a
// *FunctionError; the instance stays in the pool.
func (f *function) do(ctx context.Context, c call, res *Result) error {
	in, cs, err := f.acquire(ctx)
	if err != nil {
		f.o.cfg.Metrics.invocation(f.spec.Name, errorKind(err))
		return err
	}
	callCtx, answered := withAnswer(ctx)
	t0 := time.Now()
	hdr, untimed, err := c(callCtx, in, cs != nil)
	invokeDur := time.Since(t0) - untimed
	if cs != nil && in.persisted != nil {
		// A cold start's reply leaves only once the instance's record
		// is stored (written while connecting and invoking; a wait here
		// shows in Total only).
		<-in.persisted
	}
	if err != nil {
		err = f.invocationError(ctx, in, answered.Load(), err)
		f.release(in, false)
		f.o.cfg.Metrics.invocation(f.spec.Name, errorKind(err))
		if errors.Is(err, ErrFunction) {
			f.mu.Lock()
			first := in.served == 0
			f.mu.Unlock()
			if first && in.startMode == ModeBoot && f.spec.StartMode != ModeBoot {
				f.o.log.Warn("first invocation failed with the function's own error; the snapshot waits for a successful one",
					"function", f.spec.Name, "instance", in.id, "err", err)
			}
		}
		return err
	}
	res.InstanceID, res.StartMode = in.id, in.startMode
	f.mu.Lock()
	first := in.served == 0
	if cs != nil {
		f.cold++
		f.lastCold = time.Since(cs.begin)
	} else {
		f.warm++
	}
	f.mu.Unlock()
	if cs != nil {
		res.Cold = true
		cs.add("FuncInvocation", invokeDur)
		cs.add("Total", time.Since(cs.begin))
		res.Stages = cs.stages
		res.Memory = cs.memory
		// The function's own part of FuncInvocation, where the sandbox
		// reports it: a figure beside the stages, not one of them (the
		// stages add up to Total).
		if v := hdr.Get(sandbox.GuestTimeHeader); len(v) == 1 {
			if us, perr := strconv.ParseInt(v[0], 10, 64); perr == nil && us >= 0 {
				if res.Memory == nil {
					res.Memory = map[string]int64{}
				}
				res.Memory["GuestTimeUs"] = us
			}
		}
		f.o.cfg.Metrics.observeStages(f.spec.Name, in.startMode, res.Stages)
		f.o.cfg.Metrics.invocation(f.spec.Name, "cold")
	} else {
		f.o.cfg.Metrics.invocation(f.spec.Name, "warm")
	}
	if rr, ok := in.sb.(sandbox.RestoreReporter); ok && first {
		// Page statistics after the first invocation of a restored
		// instance: what REAP's tables report.
		st := rr.RestoreStats()
		if res.Memory == nil {
			res.Memory = map[string]int64{}
		}
		for k, v := range st.Pages {
			res.Memory[k] = v
		}
		for k, v := range st.Stages {
			res.Memory[k+"Us"] = v.Microseconds()
		}
	}
	f.release(in, true)
	if first {
		f.afterFirstInvocation(in)
	}
	return nil
}

// errorKind is the invocations_total kind of a failed invocation: the
// function's own error, an instance that failed (died, hung up, could not
// start), one killed at its memory limit, or anything else (queue timeout,
// cancelled, not deployed).
func errorKind(err error) string {
	switch {
	case errors.Is(err, ErrFunction):
		return "function_error"
	case errors.Is(err, ErrOutOfMemory):
		return "oom"
	case errors.Is(err, ErrInstanceFailed), errors.Is(err, ErrStartFailed):
		return "instance_failure"
	}
	return "error"
}

// instanceDeathGrace is how long a request that got no answer waits for its
// sandbox to be reported dead before the error is classified: a killed
// sandbox takes a moment to be reaped under load. Errors the function
// answered with never wait.
const instanceDeathGrace = 250 * time.Millisecond

// invocationError classifies an invocation failure. A status the function
// answered with is its own: returned as a *FunctionError at once, whatever
// its code. Without an answer, the caller's own deadline or cancellation
// is reported as such; otherwise the instance failed, and if its sandbox
// died the error says so with its exit reason.
func (f *function) invocationError(ctx context.Context, in *instance, answered bool, err error) error {
	if answered && !in.sandboxDone() {
		var fe *FunctionError
		if errors.As(err, &fe) {
			return fe
		}
		if st, ok := status.FromError(err); ok {
			return &FunctionError{Function: f.spec.Name, Instance: in.id, Status: st}
		}
		return fmt.Errorf("%w: function %q (instance %q): %w", ErrFunction, f.spec.Name, in.id, err)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("invoke %q on instance %q: %w", f.spec.Name, in.id, ctx.Err())
	}
	select {
	case <-in.sb.Done():
		if errors.Is(in.sb.Err(), sandbox.ErrOutOfMemory) {
			return fmt.Errorf("%w: instance %q of %q was killed at its memory limit of %d MiB during the request: %v", ErrOutOfMemory, in.id, f.spec.Name, f.spec.MemoryMiB, in.sb.Err())
		}
		return fmt.Errorf("%w: instance %q of %q exited during the request: %v (invocation error: %v)", ErrInstanceFailed, in.id, f.spec.Name, in.sb.Err(), err)
	case <-time.After(instanceDeathGrace):
	}
	return fmt.Errorf("%w: instance %q of %q did not answer: %v", ErrInstanceFailed, in.id, f.spec.Name, err)
}

func (in *instance) sandboxDone() bool {
	select {
	case <-in.sb.Done():
		return true
	default:
		return false
	}
}

// watch removes an instance from the pool when its sandbox exits on its own.
func (f *function) watch(in *instance) {
	<-in.sb.Done()
	f.mu.Lock()
	stopping := in.stopping
	if !stopping {
		in.stopping = true
		f.removeLocked(in)
	}
	f.mu.Unlock()
	if stopping {
		return
	}
	reason := "crash"
	if errors.Is(in.sb.Err(), sandbox.ErrOutOfMemory) {
		reason = "oom"
	}
	f.o.cfg.Metrics.instanceExit(f.spec.Name, reason)
	f.o.log.Warn("instance exited", "function", f.spec.Name, "instance", in.id, "reason", reason, "err", in.sb.Err())
	f.finalize(context.Background(), in)
}

// removeLocked takes in out of the pool. Caller holds f.mu.
func (f *function) removeLocked(in *instance) {
	for i, x := range f.instances {
		if x == in {
			f.instances = append(f.instances[:i], f.instances[i+1:]...)
			break
		}
	}
	f.o.cfg.Metrics.setInstances(f.spec.Name, len(f.instances))
	f.broadcast()
}

// stopInstance takes in out of the pool (if there) and stops it.
func (f *function) stopInstance(ctx context.Context, in *instance, why string) {
	f.mu.Lock()
	if in.stopping {
		f.mu.Unlock()
		return
	}
	in.stopping = true
	f.removeLocked(in)
	f.mu.Unlock()
	f.o.log.Info("stopping instance", "function", f.spec.Name, "instance", in.id, "why", why)
	f.finalize(ctx, in)
}

// finalize releases an instance that is already out of the pool.
func (f *function) finalize(ctx context.Context, in *instance) {
	f.mu.Lock()
	if in.startMode == "reap-record" && in.served == 0 {
		// It ended before its recording could finish: let the next
		// restore record instead of serving every later one lazily.
		f.recording = false
	}
	f.mu.Unlock()
	if in.conn != nil {
		in.conn.Close()
	}
	if in.transport != nil {
		in.transport.CloseIdleConnections()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := in.sb.Stop(ctx); err != nil {
		f.o.log.Error("stop sandbox", "function", f.spec.Name, "instance", in.id, "err", err)
	}
	if in.persisted != nil {
		<-in.persisted
	}
	if err := f.o.cfg.Store.DeleteInstance(in.id); err != nil {
		f.o.log.Warn("forget instance", "instance", in.id, "err", err)
	}
}

// reapIdle stops instances idle for longer than the keepalive.
func (f *function) reapIdle(now time.Time) {
	f.mu.Lock()
	var idle []*instance
	for _, in := range f.instances {
		if in.inflight == 0 && !in.held && !in.stopping && now.Sub(in.lastUsed) >= f.spec.Keepalive {
			idle = append(idle, in)
		}
	}
	f.mu.Unlock()
	for _, in := range idle {
		f.mu.Lock()
		still := in.inflight == 0 && !in.held && !in.stopping
		f.mu.Unlock()
		if still {
			f.stopInstance(context.Background(), in, "keepalive expired")
		}
	}
}

// drain waits until no request is in flight on the function, or timeout.
func (f *function) drain(ctx context.Context, timeout time.Duration) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		f.mu.Lock()
		busy := 0
		for _, in := range f.instances {
			busy += in.inflight
		}
		busy += f.starting
		ch := f.changed
		f.mu.Unlock()
		if busy == 0 {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			f.o.log.Warn("drain timed out; stopping instances with requests in flight", "function", f.spec.Name, "in_flight", busy)
			return
		case <-ctx.Done():
			return
		}
	}
}

// stopAll drains then stops every instance; returns how many were stopped.
func (f *function) stopAll(ctx context.Context, timeout time.Duration) int {
	f.drain(ctx, timeout)
	f.mu.Lock()
	all := append([]*instance(nil), f.instances...)
	f.mu.Unlock()
	var wg sync.WaitGroup
	for _, in := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.stopInstance(ctx, in, "stop requested")
		}()
	}
	wg.Wait()
	return len(all)
}

// shutdown rejects new requests, drains and stops everything.
func (f *function) shutdown(ctx context.Context, timeout time.Duration) {
	f.mu.Lock()
	f.removed = true
	f.broadcast()
	f.mu.Unlock()
	f.stopAll(ctx, timeout)
}

func (f *function) instanceInfos(ctx context.Context, withStats bool) []InstanceInfo {
	f.mu.Lock()
	all := append([]*instance(nil), f.instances...)
	infos := make([]InstanceInfo, len(all))
	for i, in := range all {
		infos[i] = InstanceInfo{ID: in.id, Function: f.spec.Name, Sandbox: f.spec.Sandbox, StartMode: in.startMode,
			Endpoint: in.sb.Endpoint(), Started: in.started, InFlight: in.inflight}
	}
	f.mu.Unlock()
	if withStats {
		for i, in := range all {
			st, err := in.sb.Stats(ctx)
			if err != nil {
				f.o.log.Warn("instance stats", "instance", in.id, "err", err)
				continue
			}
			infos[i].Stats = st
		}
	}
	return infos
}

func (f *function) persistInstance(in *instance) {
	if err := f.o.cfg.Store.PutInstance(store.InstanceRecord{ID: in.id, Function: f.spec.Name, Sandbox: f.spec.Sandbox, Started: in.started}); err != nil {
		f.o.log.Warn("record instance", "instance", in.id, "err", err)
	}
}
