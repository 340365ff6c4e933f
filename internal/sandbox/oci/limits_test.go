package oci

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

func TestResourceLimits(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			spec := e.spec("limits-" + rt)
			spec.MemoryLimit = 96 << 20
			spec.CPULimit = 0.5
			sb := e.start(t, spec)
			get(t, sb.Endpoint(), "/count")

			dirs := e.b.CgroupDirs(spec.ID)
			if len(dirs) == 0 {
				t.Fatalf("no cgroup for %q", spec.ID)
			}
			want := map[string]string{
				"memory.limit_in_bytes": strconv.Itoa(96 << 20), // v1
				"cpu.cfs_quota_us":      "50000",                // v1
				"memory.max":            strconv.Itoa(96 << 20), // v2
				"cpu.max":               "50000 100000",         // v2
			}
			found := 0
			for _, d := range dirs {
				for file, w := range want {
					b, err := os.ReadFile(filepath.Join(d, file))
					if err != nil {
						continue
					}
					found++
					if got := strings.TrimSpace(string(b)); got != w {
						t.Errorf("%s/%s = %q, want %q", d, file, got, w)
					}
				}
			}
			if found < 2 {
				t.Fatalf("found %d of the memory/cpu limit files in %v", found, dirs)
			}

			// Allocating beyond the limit must end the sandbox (or fail the
			// allocation inside gVisor's own memory accounting).
			c := &http.Client{Timeout: 3 * time.Second}
			resp, err := c.Get(fmt.Sprintf("http://%s/alloc?mb=200", sb.Endpoint()))
			if err == nil {
				resp.Body.Close()
			}
			select {
			case <-sb.Done():
				t.Logf("%s over the memory limit: %v", rt, sb.Err())
				if !errors.Is(sb.Err(), sandbox.ErrOutOfMemory) {
					t.Fatalf("%s over the memory limit: %v, want it reported as out of memory", rt, sb.Err())
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("allocating 200 MiB under a 96 MiB limit did not end the sandbox (request err %v)", err)
			}
		})
	}
}
