package orchestrator

import "errors"

// Error classes. Every error the orchestrator returns wraps one of these (or
// a context error), and the API layer maps them to gRPC codes.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	ErrInvalid       = errors.New("invalid argument")
	ErrUnsupported   = errors.New("not supported")
	// ErrUnavailable: no instance could be had in time (max-instances
	// reached and the queue deadline passed, or the function is being
	// removed).
	ErrUnavailable = errors.New("unavailable")
	// ErrStartFailed: an instance could not be started (sandbox exited,
	// never listened, image unusable).
	ErrStartFailed = errors.New("instance start failed")
	// ErrInstanceFailed: the instance died or failed while serving.
	ErrInstanceFailed = errors.New("instance failed")
	// ErrOutOfMemory: the instance was killed at its memory limit (the
	// sandbox reported sandbox.ErrOutOfMemory).
	ErrOutOfMemory = errors.New("out of memory")
)
