// Command testfn is the function the sandbox tests run inside every backend:
// a small static HTTP server on $GUEST_PORT whose state (a counter) survives
// snapshot/restore, and which reports its environment so the tests can check
// that Spec.Process was applied.
//
// Endpoints: /count (increments and returns the counter), /info (JSON with
// env, cwd, uid, gid, num_cpu — the CPUs it may run on — and mem_total_kib,
// MemTotal of /proc/meminfo or -1), /alloc?mb=N (allocates and touches N MiB, kept),
// /random (16 bytes from the kernel's RNG, hex), /clock (the wall clock in
// Unix nanoseconds): clones of one snapshot must differ in the first and
// tell the current time in the second.
// With TESTFN_EXIT=<code> it writes TESTFN_STDERR to stderr and exits at once.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	if code := os.Getenv("TESTFN_EXIT"); code != "" {
		fmt.Fprintln(os.Stderr, os.Getenv("TESTFN_STDERR"))
		n, err := strconv.Atoi(code)
		if err != nil {
			n = 2
		}
		os.Exit(n)
	}
	port := os.Getenv("GUEST_PORT")
	if port == "" {
		port = "50051"
	}
	var (
		mu    sync.Mutex
		count int
		keep  [][]byte
	)
	mux := http.NewServeMux()
	mux.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		count++
		n := count
		mu.Unlock()
		fmt.Fprintf(w, "%d", n)
	})
	mux.HandleFunc("/info", func(w http.ResponseWriter, r *http.Request) {
		cwd, _ := os.Getwd()
		_ = json.NewEncoder(w).Encode(map[string]any{
			"env": os.Environ(), "cwd": cwd, "uid": os.Getuid(), "gid": os.Getgid(),
			"num_cpu": runtime.NumCPU(), "mem_total_kib": memTotalKiB(),
		})
	})
	mux.HandleFunc("/alloc", func(w http.ResponseWriter, r *http.Request) {
		mb, err := strconv.Atoi(r.URL.Query().Get("mb"))
		if err != nil || mb <= 0 {
			http.Error(w, "bad mb", http.StatusBadRequest)
			return
		}
		b := make([]byte, mb<<20)
		for i := range b {
			if i%4096 == 0 {
				b[i] = 1
			}
		}
		mu.Lock()
		keep = append(keep, b)
		mu.Unlock()
		fmt.Fprintf(w, "%d", mb)
	})
	mux.HandleFunc("/random", func(w http.ResponseWriter, r *http.Request) {
		b := make([]byte, 16)
		if _, err := rand.Read(b); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, hex.EncodeToString(b))
	})
	mux.HandleFunc("/clock", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d", time.Now().UnixNano())
	})
	mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Query().Get("path")
		if err := os.WriteFile(p, []byte("written"), 0o644); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "ok")
	})
	ln, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, "testfn listening on", ln.Addr())
	if err := http.Serve(ln, mux); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

// memTotalKiB is MemTotal from /proc/meminfo (-1 when unreadable).
func memTotalKiB() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}
