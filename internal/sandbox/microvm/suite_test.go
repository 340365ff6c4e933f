package microvm

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/sandbox/sandboxtest"
)

func TestConformance(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.BootTimeout = 5 * time.Minute })
	sandboxtest.Run(t, e.b, sandboxtest.Config{
		Spec: func(t testing.TB, id string) sandbox.Spec { return e.spec(id) },
		Exiting: func(t testing.TB, id, marker string) sandbox.Spec {
			s := e.spec(id)
			s.Process.Env = []string{"TESTFN_EXIT=3", "TESTFN_STDERR=" + marker}
			return s
		},
		Ping: func(ctx context.Context, endpoint string) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+endpoint+"/count", nil)
			if err != nil {
				return err
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			_, err = io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("status %s", resp.Status)
			}
			return err
		},
		Leftovers: func(id string) []string {
			var left []string
			if _, err := os.Stat(e.b.InstanceDir(id)); err == nil {
				left = append(left, "instance dir "+e.b.InstanceDir(id))
			}
			base := e.b.sockBase(id)
			for _, p := range []string{base + ".qmp", base + ".agent", e.b.MemoryFile(id)} {
				if _, err := os.Stat(p); err == nil {
					left = append(left, p)
				}
			}
			return left
		},
		Timeout: 2 * time.Minute,
	})
}
