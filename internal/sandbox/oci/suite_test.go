package oci

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/sandbox/sandboxtest"
)

func TestConformance(t *testing.T) {
	for _, separate := range []bool{false, true} {
		for _, rt := range runtimes {
			name := rt
			if separate {
				name += "/separate-create"
			}
			t.Run(name, func(t *testing.T) { conformance(t, rt, separate) })
		}
	}
}

// conformance runs the suite; separate selects Config.SeparateCreate
// (create in Create, start in Start) instead of one `run` in Start.
func conformance(t *testing.T, rt string, separate bool) {
	e := newEnv(t, rt, func(c *Config) { c.SeparateCreate = separate })
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
			bundle := filepath.Join(e.root, "bundles", id)
			if _, err := os.Stat(bundle); err == nil {
				left = append(left, "bundle "+bundle)
			}
			ms, _ := mountinfo.Under(bundle)
			left = append(left, ms...)
			left = append(left, e.b.CgroupDirs(id)...)
			return left
		},
	})
}
