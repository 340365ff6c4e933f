// Command probe is a test function whose misbehaviour is chosen by env:
// PROBE_MODE=crash writes to stderr and exits 3 at start; PROBE_MODE=nolisten
// never listens; otherwise it serves Greeter: payload "sleep:<ms>" sleeps
// that long, "counter" returns a per-instance counter, anything else echoes.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

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
		if payload == "counter" {
			return strconv.FormatInt(n.Add(1), 10), nil
		}
		return "echo " + payload, nil
	})
}
