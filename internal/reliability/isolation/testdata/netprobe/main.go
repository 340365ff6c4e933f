// Command netprobe is a test function that tries to reach things from
// inside its sandbox and reports what happened, one request per attempt:
//
//	tcp HOST:PORT   dial TCP (2 s timeout): "connected" or "failed: <error>"
//	unix PATH       dial a unix socket: the same
//	stat PATH       "exists" or "absent: <error>"
//	alloc MIB       allocate and touch MIB MiB, then reply "allocated"
//	addrs           the addresses of its interfaces
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"vhive.dev/vhive/functions/sdk"
)

var hold [][]byte

func main() {
	sdk.Run(func(ctx context.Context, payload string) (string, error) {
		verb, arg, _ := strings.Cut(payload, " ")
		switch verb {
		case "tcp", "unix":
			d := net.Dialer{Timeout: 2 * time.Second}
			c, err := d.DialContext(ctx, verb, arg)
			if err != nil {
				return "failed: " + err.Error(), nil
			}
			c.Close()
			return "connected", nil
		case "stat":
			if _, err := os.Stat(arg); err != nil {
				return "absent: " + err.Error(), nil
			}
			return "exists", nil
		case "alloc":
			mib, err := strconv.Atoi(arg)
			if err != nil {
				return "", err
			}
			for range mib {
				b := make([]byte, 1<<20)
				for i := 0; i < len(b); i += 4096 {
					b[i] = 1
				}
				hold = append(hold, b)
			}
			return "allocated", nil
		case "addrs":
			as, err := net.InterfaceAddrs()
			if err != nil {
				return "", err
			}
			var out []string
			for _, a := range as {
				out = append(out, a.String())
			}
			return strings.Join(out, " "), nil
		}
		return "", fmt.Errorf("netprobe: unknown request %q", payload)
	})
}
