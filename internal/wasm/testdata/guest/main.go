//go:build wasip1

// Command guest is the test function for internal/wasm: a Go wasip1 reactor
// implementing the vhive guest ABI directly (functions/sdk is not used so
// that these tests depend on nothing outside the package). It is stateful on
// purpose: a counter, a table built at init (VHIVE_TABLE_MB, default 1 MiB)
// and a goroutine fed through a channel, so that a snapshot that loses any of
// them gives a different answer. At init, VHIVE_TEST_STDERR is written to
// stderr and VHIVE_TEST_EXIT (any value) makes the guest exit with status 3.
//
// Requests (the request bytes):
//
//	inc            increment the counter, reply with it
//	get            the counter
//	sum:<a>:<n>    sum of n table words starting at word a
//	lookup:<seed>  sum of 512 pseudo-random table words chosen by seed
//	sleep:<ms>     sleep (timers, the clock), reply "slept"
//	echo:<s>       a round trip through the helper goroutine
//	fail           an error status with message "failed on purpose"
//	exit           os.Exit(3) inside the guest
//	anything else  "Hello, <request>!"
package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

var (
	live    = map[uintptr][]byte{}
	status  int32
	counter uint64
	table   []uint64
	jobs    = make(chan string)
	results = make(chan string)
)

//go:wasmexport vhive_alloc
func vhiveAlloc(size int32) int32 {
	if size < 1 {
		size = 1
	}
	b := make([]byte, size)
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	live[p] = b
	return int32(p)
}

//go:wasmexport vhive_free
func vhiveFree(ptr int32) {
	delete(live, uintptr(ptr))
}

//go:wasmexport vhive_status
func vhiveStatus() int32 { return status }

//go:wasmexport vhive_handle
func vhiveHandle(ptr, n int32) int64 {
	req := live[uintptr(ptr)][:n]
	resp, err := handle(string(req))
	status = 0
	if err != nil {
		status = 1
		resp = err.Error()
	}
	p := vhiveAlloc(int32(len(resp)))
	copy(live[uintptr(p)], resp)
	return int64(p)<<32 | int64(len(resp))
}

func handle(req string) (string, error) {
	cmd, arg, _ := strings.Cut(req, ":")
	switch cmd {
	case "inc":
		counter++
		return strconv.FormatUint(counter, 10), nil
	case "get":
		return strconv.FormatUint(counter, 10), nil
	case "sum":
		a, n, _ := strings.Cut(arg, ":")
		start, err1 := strconv.Atoi(a)
		cnt, err2 := strconv.Atoi(n)
		if err1 != nil || err2 != nil || start < 0 || cnt < 0 || start+cnt > len(table) {
			return "", fmt.Errorf("bad sum %q (table has %d words)", arg, len(table))
		}
		var s uint64
		for _, v := range table[start : start+cnt] {
			s += v
		}
		return strconv.FormatUint(s, 10), nil
	case "lookup":
		seed, err := strconv.ParseUint(arg, 10, 64)
		if err != nil {
			return "", fmt.Errorf("bad seed %q", arg)
		}
		x := seed*2654435761 + 1
		var s uint64
		for i := 0; i < 512; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			s += table[x%uint64(len(table))]
		}
		return strconv.FormatUint(s, 10), nil
	case "sleep":
		ms, _ := strconv.Atoi(arg)
		t0 := time.Now()
		time.Sleep(time.Duration(ms) * time.Millisecond)
		if time.Since(t0) < time.Duration(ms)*time.Millisecond {
			return "", fmt.Errorf("clock went backwards")
		}
		return "slept", nil
	case "echo":
		jobs <- arg
		return <-results, nil
	case "fail":
		return "", fmt.Errorf("failed on purpose")
	case "exit":
		os.Exit(3)
	}
	return "Hello, " + req + "!", nil
}

// init, not main: in a -buildmode=c-shared reactor _initialize runs the
// package initialisers; main.main is never called.
func init() {
	if m := os.Getenv("VHIVE_TEST_STDERR"); m != "" {
		fmt.Fprintln(os.Stderr, m)
	}
	if os.Getenv("VHIVE_TEST_EXIT") != "" {
		os.Exit(3)
	}
	mb := 1
	if s := os.Getenv("VHIVE_TABLE_MB"); s != "" {
		mb, _ = strconv.Atoi(s)
	}
	table = make([]uint64, mb<<17)
	x := uint64(88172645463325252)
	for i := range table {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		table[i] = x
	}
	go func() {
		for j := range jobs {
			results <- "echo " + j
		}
	}()
}

func main() {}
