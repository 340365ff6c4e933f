// Command slow is a test function: payload "sleep:<ms>" sleeps that long
// before it answers, "counter" returns a per-instance counter, anything else
// is echoed.
package main

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"vhive.dev/vhive/functions/sdk"
)

func main() {
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
