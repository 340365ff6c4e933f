// Command probe is a test function whose misbehaviour is chosen by env:
// PROBE_MODE=crash writes to stderr and exits 3 at start; PROBE_MODE=nolisten
// never listens; otherwise it serves Greeter: payload "sleep:<ms>" sleeps
// that long, "counter" returns a per-instance counter, "status:<code>:<msg>"
// returns that gRPC status (the code as a number), "fail-first" fails with
// FailedPrecondition on an instance's first such call and succeeds after;
// anything else echoes.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/functions/sdk"
)

func main() {
	switch os.Getenv("PROBE_MODE") {
	case "crash":
		fmt.Fprintln(os.Stderr, "probe: boom: refusing to start (PROBE_MODE=crash)")
		os.Exit(3)
	case "nolisten":
		for {
			time.Sleep(time.Hour)
		}
	}
	var n atomic.Int64
	var failed atomic.Bool
	sdk.Run(func(ctx context.Context, payload string) (string, error) {
		if ms, ok := strings.CutPrefix(payload, "sleep:"); ok {
			d, err := strconv.Atoi(ms)
			if err != nil {
				return "", err
			}
			select {
			case <-time.After(time.Duration(d) * time.Millisecond):
			case <-ctx.Done():
				return "", ctx.Err()
			}
			return "slept " + ms, nil
		}
		if rest, ok := strings.CutPrefix(payload, "status:"); ok {
			c, msg, _ := strings.Cut(rest, ":")
			n, err := strconv.ParseUint(c, 10, 32)
			if err != nil {
				return "", err
			}
			return "", status.Error(codes.Code(n), msg)
		}
		if payload == "fail-first" {
			if failed.CompareAndSwap(false, true) {
				return "", status.Error(codes.FailedPrecondition, "probe: the first fail-first call fails")
			}
			return "ok after a failure", nil
		}
		if payload == "counter" {
			return strconv.FormatInt(n.Add(1), 10), nil
		}
		return "echo " + payload, nil
	})
}
