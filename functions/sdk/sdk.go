package sdk

import "context"

// Handler runs one invocation: payload is the request (HelloRequest.name on
// Linux, the request bytes in wasm) and the returned string is the reply.
type Handler func(ctx context.Context, payload string) (string, error)
