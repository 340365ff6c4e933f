package api

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/snapshot"
)

// toStatus converts an internal error to a gRPC status at the edge: the
// error classes of the orchestrator and the image service map to codes, the
// message is kept whole.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	// The function's own status reaches the caller unchanged.
	var fe *orchestrator.FunctionError
	if errors.As(err, &fe) {
		return fe.Status.Err()
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, orchestrator.ErrNotFound), errors.Is(err, image.ErrNotFound), errors.Is(err, snapshot.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, orchestrator.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, orchestrator.ErrInvalid), errors.Is(err, image.ErrInvalid), errors.Is(err, image.ErrUnsafeLayer):
		code = codes.InvalidArgument
	case errors.Is(err, orchestrator.ErrOutOfMemory):
		code = codes.ResourceExhausted
	case errors.Is(err, orchestrator.ErrUnsupported):
		code = codes.Unimplemented
	case errors.Is(err, image.ErrInUse):
		code = codes.FailedPrecondition
	case errors.Is(err, orchestrator.ErrUnavailable), errors.Is(err, image.ErrUnavailable),
		errors.Is(err, orchestrator.ErrStartFailed), errors.Is(err, orchestrator.ErrInstanceFailed):
		code = codes.Unavailable
	}
	return status.Error(code, err.Error())
}
