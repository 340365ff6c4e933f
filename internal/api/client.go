package api

import (
	"fmt"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// ControlTarget is where a client reaches the control API: a unix socket
// path (optionally written unix:///path) or tcp://HOST:PORT.
type ControlTarget struct {
	Network string // "unix" or "tcp"
	Address string // socket path or host:port
}

// ParseControlTarget parses s: "tcp://HOST:PORT", "unix://PATH" or a path.
func ParseControlTarget(s string) (ControlTarget, error) {
	switch {
	case s == "":
		return ControlTarget{}, fmt.Errorf("control target: empty (want a socket path or tcp://HOST:PORT)")
	case strings.HasPrefix(s, "tcp://"):
		hp := strings.TrimPrefix(s, "tcp://")
		host, port, err := net.SplitHostPort(hp)
		if err != nil || host == "" || port == "" {
			return ControlTarget{}, fmt.Errorf("control target %q: want tcp://HOST:PORT", s)
		}
		return ControlTarget{Network: "tcp", Address: hp}, nil
	case strings.HasPrefix(s, "unix://"):
		p := strings.TrimPrefix(s, "unix://")
		if p == "" {
			return ControlTarget{}, fmt.Errorf("control target %q: empty socket path", s)
		}
		return ControlTarget{Network: "unix", Address: p}, nil
	case strings.Contains(s, "://"):
		return ControlTarget{}, fmt.Errorf("control target %q: unknown scheme (want a socket path or tcp://HOST:PORT)", s)
	}
	return ControlTarget{Network: "unix", Address: s}, nil
}

func (t ControlTarget) String() string {
	if t.Network == "tcp" {
		return "tcp://" + t.Address
	}
	if strings.Contains(t.Address, "://") {
		// A path that reads like a URL prints with its scheme, so that it
		// parses back to itself.
		return "unix://" + t.Address
	}
	return t.Address
}

// DialControl connects to the control API at t. A non-empty token is sent
// with every call (the daemon requires it on TCP; on the unix socket,
// whose 0600 mode is the access check, it is ignored).
func DialControl(t ControlTarget, token string) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if token != "" {
		if err := checkToken(token); err != nil {
			return nil, fmt.Errorf("control token: %w", err)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(TokenCredentials{Token: token}))
	}
	var target string
	switch t.Network {
	case "unix":
		if _, err := os.Stat(t.Address); err != nil {
			return nil, fmt.Errorf("vhive daemon socket %s: %w (is `vhive daemon` running? set --socket or VHIVE_SOCKET)", t.Address, err)
		}
		target = "unix://" + t.Address
	case "tcp":
		target = "passthrough:///" + t.Address
	default:
		return nil, fmt.Errorf("control target: network %q (want unix or tcp)", t.Network)
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to daemon at %s: %w", t, err)
	}
	return conn, nil
}

// ClientToken returns the control token a client sends: the content of
// tokenFile if set (same rules as the daemon's file, except the mode), else
// env (VHIVE_TOKEN).
func ClientToken(tokenFile, env string) (string, error) {
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return "", fmt.Errorf("--token-file: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return strings.TrimSpace(env), nil
}
