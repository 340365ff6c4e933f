package cri

import (
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// broadcaster fans container events out to GetContainerEvents streams.
// A subscriber that falls more than eventBuffer events behind loses the
// oldest ones (kubelet relists periodically, so a lost event is not fatal).
type broadcaster struct {
	mu     sync.Mutex
	subs   map[chan *runtimeapi.ContainerEventResponse]struct{}
	closed bool
}

const eventBuffer = 1024

func newBroadcaster() *broadcaster {
	return &broadcaster{subs: map[chan *runtimeapi.ContainerEventResponse]struct{}{}}
}

func (b *broadcaster) subscribe() (ch chan *runtimeapi.ContainerEventResponse, cancel func()) {
	ch = make(chan *runtimeapi.ContainerEventResponse, eventBuffer)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		close(ch)
		return ch, func() {}
	}
	b.subs[ch] = struct{}{}
	return ch, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if _, ok := b.subs[ch]; ok {
			delete(b.subs, ch)
			close(ch)
		}
	}
}

func (b *broadcaster) publish(ev *runtimeapi.ContainerEventResponse) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- ev:
		default:
			select { // drop the oldest, keep the newest
			case <-ch:
			default:
			}
			select {
			case ch <- ev:
			default:
			}
		}
	}
}

func (b *broadcaster) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for ch := range b.subs {
		delete(b.subs, ch)
		close(ch)
	}
}

// emit publishes an event about c (s.mu must NOT be held).
func (s *Server) emit(c *container, typ runtimeapi.ContainerEventType) {
	st := s.containerStatus(c)
	s.events.publish(&runtimeapi.ContainerEventResponse{
		ContainerId:        c.ID,
		ContainerEventType: typ,
		CreatedAt:          time.Now().UnixNano(),
		PodSandboxStatus:   &runtimeapi.PodSandboxStatus{Id: c.PodID},
		ContainersStatuses: []*runtimeapi.ContainerStatus{st},
	})
}

// GetContainerEvents streams the events of vhive's containers merged with
// containerd's (when containerd supports the call).
func (s *Server) GetContainerEvents(req *runtimeapi.GetEventsRequest, stream grpc.ServerStreamingServer[runtimeapi.ContainerEventResponse]) error {
	ctx := stream.Context()
	mine, cancel := s.events.subscribe()
	defer cancel()
	theirs := make(chan *runtimeapi.ContainerEventResponse, 64)
	go func() { // owned here: ends when ctx is cancelled or containerd's stream ends
		defer close(theirs)
		cs, err := s.rt.GetContainerEvents(ctx, req)
		if err != nil {
			return
		}
		for {
			ev, err := cs.Recv()
			if err != nil {
				return
			}
			select {
			case theirs <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-mine:
			if !ok {
				return status.Error(codes.Unavailable, "cri: server is shutting down")
			}
			if err := stream.Send(ev); err != nil {
				return err
			}
		case ev, ok := <-theirs:
			if !ok {
				theirs = nil // containerd has no events (or went away); keep ours
				continue
			}
			if err := stream.Send(ev); err != nil {
				return err
			}
		}
	}
}
