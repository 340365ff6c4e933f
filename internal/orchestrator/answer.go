package orchestrator

import (
	"context"
	"net/http/httptrace"
	"sync/atomic"

	"google.golang.org/grpc/stats"
)

// answerKey carries, in an RPC's context, the flag answerTracker sets.
type answerKey struct{}

// withAnswer returns ctx carrying a flag that is set once the function
// answers the RPC made with it: headers, a trailers-only status or a message
// arrived from the server. A status that arrived is the function's; one
// made up by the client (connection refused, reset, closed) is not.
//
// For HTTP functions, the first byte of a response is the answer.
func withAnswer(ctx context.Context) (context.Context, *atomic.Bool) {
	a := new(atomic.Bool)
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotFirstResponseByte: func() { a.Store(true) }})
	return context.WithValue(ctx, answerKey{}, a), a
}

// answerTracker is the stats handler of every instance connection that sets
// the flag of withAnswer.
type answerTracker struct{}

func (answerTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (answerTracker) HandleRPC(ctx context.Context, s stats.RPCStats) {
	switch s.(type) {
	case *stats.InHeader, *stats.InTrailer, *stats.InPayload:
		if a, ok := ctx.Value(answerKey{}).(*atomic.Bool); ok {
			a.Store(true)
		}
	}
}

func (answerTracker) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }

func (answerTracker) HandleConn(context.Context, stats.ConnStats) {}
