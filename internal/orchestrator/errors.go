package orchestrator

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/status"
)

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

// ErrFunction classifies the function's own errors: the function answered a
// request with an error status. The instance is healthy and stays in the
// pool; the status reaches the caller unchanged.
var ErrFunction = errors.New("function error")

// FunctionError is a status the function itself returned.
type FunctionError struct {
	Function string
	Instance string
	Status   *status.Status
}

func (e *FunctionError) Error() string {
	return fmt.Sprintf("function %q (instance %q) returned %s: %s", e.Function, e.Instance, e.Status.Code(), e.Status.Message())
}

// Is makes errors.Is(err, ErrFunction) hold.
func (e *FunctionError) Is(target error) bool { return target == ErrFunction }

// GRPCStatus is the function's status, unchanged (code, message, details).
func (e *FunctionError) GRPCStatus() *status.Status { return e.Status }
