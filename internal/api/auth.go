package api

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TokenHeader is the gRPC metadata key carrying the control token, as
// "Bearer <token>".
const TokenHeader = "authorization"

// MinTokenLen is the shortest control token the daemon accepts.
const MinTokenLen = 16

// ReadTokenFile reads a control token from path: the file's content with
// surrounding white space removed. The file must not be readable by group or
// others (like ssh keys), and the token must be at least MinTokenLen bytes
// of printable ASCII.
func ReadTokenFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("control token file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("control token file %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("control token file %s: mode %#o lets group or others read it; chmod 600 it", path, perm)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("control token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if err := checkToken(tok); err != nil {
		return nil, fmt.Errorf("control token file %s: %w", path, err)
	}
	return []byte(tok), nil
}

func checkToken(tok string) error {
	if len(tok) < MinTokenLen {
		return fmt.Errorf("token of %d bytes is too short (want at least %d, e.g. `openssl rand -hex 32`)", len(tok), MinTokenLen)
	}
	for i := 0; i < len(tok); i++ {
		if c := tok[i]; c < 0x21 || c > 0x7e {
			return errors.New("token holds a character that is not printable ASCII")
		}
	}
	return nil
}

// TokenAuth checks the control token of every call on a gRPC server: a call
// without the token, or with another, fails with Unauthenticated before any
// handler runs. The comparison takes constant time.
type TokenAuth struct {
	token []byte
}

// NewTokenAuth returns the check for token (which must pass ReadTokenFile's
// rules).
func NewTokenAuth(token []byte) (*TokenAuth, error) {
	if err := checkToken(string(token)); err != nil {
		return nil, err
	}
	return &TokenAuth{token: append([]byte(nil), token...)}, nil
}

// ServerOptions returns the interceptors to pass to grpc.NewServer.
func (a *TokenAuth) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := a.check(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := a.check(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}

func (a *TokenAuth) check(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(TokenHeader)
	if len(vals) == 0 {
		return status.Error(codes.Unauthenticated, "control API on TCP: no token (pass --token-file or set VHIVE_TOKEN)")
	}
	got, ok := strings.CutPrefix(vals[0], "Bearer ")
	// ConstantTimeCompare returns at once on a length mismatch, which
	// reveals only the token's length.
	if !ok || len(vals) != 1 || subtle.ConstantTimeCompare([]byte(got), a.token) != 1 {
		return status.Error(codes.Unauthenticated, "control API on TCP: wrong token")
	}
	return nil
}

// TokenCredentials sends a control token with every call of a client
// connection. The control API on TCP has no TLS: the token crosses the
// network in the clear, so use it on loopback or a network you trust.
type TokenCredentials struct {
	Token string
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (c TokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{TokenHeader: "Bearer " + c.Token}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (TokenCredentials) RequireTransportSecurity() bool { return false }
