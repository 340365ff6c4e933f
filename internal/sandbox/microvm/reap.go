package microvm

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/sandbox"
)

// REAP for microVMs (record and prefetch of the guest's working set, from
// the REAP paper, ASPLOS'21) on the host page cache instead of a
// userfaultfd page server: guest RAM is a private mapping of the
// snapshot's memory file, so its pages come from the page cache of that
// file.
//
// Record (sandbox.MemoryRecord): QEMU maps a read-only loop device over the
// memory file instead of the file (recordDevice: its own, initially empty
// page cache; read-ahead 0) and runs under the no-hugepage launcher
// (seccomp.go): each guest access faults in exactly its 4 KiB page.
// FinishRecord reads which pages of the mapping are present in QEMU's page
// tables (/proc/PID/pagemap: file pages and the private copies of pages the
// guest wrote), merges them into runs and writes the WS file (wsfile.go)
// atomically. The instance keeps running on the device; Stop releases it.
//
// Prefetch (sandbox.MemoryPrefetch): the WS file is read and validated
// first; then, while the netns, the tap and QEMU start and the device state
// loads, its runs — widened to 256 KiB windows (prefetchPad) — are read
// into the memory file's page cache (readahead(2) per run, then a pread
// pass that waits for them: the fastest of the methods
// BenchmarkPrefetchMethods compares, with fadvise WILLNEED). The guest
// resumes ("cont") once the set is cached; everything else faults in
// lazily. A WS file that is missing, corrupt, or recorded against a memory
// file of another size is not used: the restore logs why and runs lazily
// (RestoreStats: PrefetchFallback = 1). The memory file is the only source
// of page contents in every mode.

// reapState is the REAP part of a restore, and its page statistics.
type reapState struct {
	memPath string
	wsPath  string

	// record
	dev       *recordDevice
	recordErr error // why a record restore runs without recording

	// prefetch
	ws       *wsFile
	fallback string // why a prefetch restore runs lazily ("" if it does not)
	pfDone   chan struct{}
	pfBytes  int64
	pfErr    error
	pfDur    time.Duration

	mu          sync.Mutex
	pfWait      time.Duration
	resumed     bool
	maj0, min0  int64 // QEMU's fault counters at cont
	read0       int64 // QEMU's storage read bytes at cont
	recPages    int64
	recRuns     int64
	recDevPages int64 // pages in the record device's page cache at FinishRecord
	recMaj      int64 // QEMU's faults from cont to FinishRecord
	recMin      int64
	recorded    bool

	// capMu serialises captureRecord; captured is its result.
	capMu    sync.Mutex
	captured *wsFile
}

// startPrefetch reads and validates the WS and starts reading its runs
// into the page cache; a bad WS sets fallback instead.
func (r *reapState) startPrefetch(ctx context.Context, log *slog.Logger, id string, pad uint64) {
	t := time.Now()
	ws, err := readWS(r.wsPath, r.memPath)
	if err != nil {
		r.fallback = err.Error()
		log.Warn("REAP prefetch: working set not usable; restoring lazily", "id", id, "ws", r.wsPath, "err", err)
		return
	}
	r.ws = ws
	r.pfDone = make(chan struct{})
	go func() {
		defer close(r.pfDone)
		f, err := os.Open(r.memPath)
		if err != nil {
			r.pfErr = err
			return
		}
		defer f.Close()
		r.pfBytes, r.pfErr = prefetch(ctx, f, padRuns(ws.Runs, pad, ws.MemSize), prefetchDefault, prefetchWorkers)
		r.pfDur = time.Since(t)
		if r.pfErr != nil {
			log.Warn("REAP prefetch failed; the rest is faulted in lazily", "id", id, "err", r.pfErr)
		}
	}()
}

// waitPrefetch waits for the prefetch (if any) to end.
func (r *reapState) waitPrefetch() time.Duration {
	if r.pfDone == nil {
		return 0
	}
	t := time.Now()
	<-r.pfDone
	return time.Since(t)
}

// beforeCont is called right before the guest resumes: it waits for the
// prefetch and takes QEMU's fault counters as the baseline.
func (r *reapState) beforeCont(pid int) {
	w := r.waitPrefetch()
	maj, mnr, err := procFaults(pid)
	rd, rerr := procReadBytes(pid)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pfWait = w
	if err == nil && rerr == nil {
		r.resumed, r.maj0, r.min0, r.read0 = true, maj, mnr, rd
	}
}

// release ends what the restore holds besides QEMU: the prefetch (waited
// for) and the record device.
func (r *reapState) release() {
	r.waitPrefetch()
	r.dev.release()
}

// stats returns the stages and page statistics (fault counts live from
// QEMU pid, 0 if it is gone).
func (r *reapState) stats(pid int) (map[string]time.Duration, map[string]int64) {
	st := map[string]time.Duration{}
	pg := map[string]int64{}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.resumed && pid > 0 {
		if maj, mnr, err := procFaults(pid); err == nil {
			pg["MajorFaults"], pg["MinorFaults"] = maj-r.maj0, mnr-r.min0
			// vHive's Unique: pages read at fault time, not prefetched.
			pg["Unique"] = maj - r.maj0
		}
		if rd, err := procReadBytes(pid); err == nil {
			pg["VMMReadBytes"] = rd - r.read0
		}
	}
	switch {
	case r.ws != nil:
		st["FetchState"] = r.pfDur
		st["PrefetchWait"] = r.pfWait
		pg["RecPages"], pg["RecRegions"] = r.ws.Pages(), int64(len(r.ws.Runs))
		pg["BytesRead"] = r.pfBytes
		pg["PrefetchFallback"] = 0
	case r.fallback != "":
		pg["PrefetchFallback"] = 1
	case r.dev != nil:
		pg["RecPages"], pg["RecRegions"] = r.recPages, r.recRuns
		if r.recorded {
			pg["RecDevicePages"] = r.recDevPages
			pg["RecMajorFaults"], pg["RecMinorFaults"] = r.recMaj, r.recMin
		}
	}
	return st, pg
}

var _ sandbox.Recorder = (*Sandbox)(nil)

// FinishRecord implements sandbox.Recorder for a sandbox restored in
// MemoryRecord mode: it writes the WS file of the pages the guest has
// touched since the restore (RestoreOptions.WorkingSet), atomically. The
// instance keeps running.
func (s *Sandbox) FinishRecord(ctx context.Context) error {
	s.mu.Lock()
	rp, cmd := s.restore, s.cmd
	s.mu.Unlock()
	if rp != nil && rp.reap.recordErr != nil {
		return fmt.Errorf("microvm: sandbox %q: FinishRecord: nothing recorded: %w", s.id, rp.reap.recordErr)
	}
	if rp == nil || rp.reap.dev == nil {
		return fmt.Errorf("microvm: sandbox %q: FinishRecord: not restored in record mode: %w", s.id, sandbox.ErrNotSupported)
	}
	r := &rp.reap
	r.mu.Lock()
	done := r.recorded
	r.mu.Unlock()
	if done {
		return fmt.Errorf("microvm: sandbox %q: FinishRecord called twice", s.id)
	}
	ws, err := s.captureRecord(rp, cmd)
	if err != nil {
		return fmt.Errorf("microvm: sandbox %q: FinishRecord: %w", s.id, err)
	}
	if err := writeWS(r.wsPath, ws); err != nil {
		return fmt.Errorf("microvm: sandbox %q: FinishRecord: write %s: %w", s.id, r.wsPath, err)
	}
	r.mu.Lock()
	r.recorded = true
	r.mu.Unlock()
	s.b.log.Info("REAP working set recorded", "id", s.id, "pages", ws.Pages(), "runs", len(ws.Runs), "ws", r.wsPath)
	return nil
}

// captureRecord reads, once, which pages of the record device QEMU has
// mapped: the working set up to now. FinishRecord calls it, and so does
// Stop before it ends QEMU, so an instance stopped right after its first
// invocation (before the orchestrator's FinishRecord ran) still yields its
// working set.
func (s *Sandbox) captureRecord(rp *restoreParams, cmd *exec.Cmd) (*wsFile, error) {
	r := &rp.reap
	r.capMu.Lock()
	defer r.capMu.Unlock()
	if r.captured != nil {
		return r.captured, nil
	}
	if cmd == nil || s.exited() {
		return nil, errors.New("QEMU is not running and nothing was recorded before it stopped")
	}
	pid := cmd.Process.Pid
	maj, mnr, _ := procFaults(pid)
	size := int64(rp.meta.MemoryMiB) << 20
	pages, err := presentPages(pid, r.dev.path, size)
	if err != nil {
		return nil, err
	}
	devPages, err := cachedPages(r.dev.f, size)
	if err != nil {
		devPages, _ = mincorePages(r.dev.path, size)
	}
	ws := &wsFile{MemSize: uint64(size), Runs: runsOfPages(pages)}
	r.captured = ws
	r.mu.Lock()
	r.recPages, r.recRuns, r.recDevPages = ws.Pages(), int64(len(ws.Runs)), devPages
	r.recMaj, r.recMin = maj-r.maj0, mnr-r.min0
	r.mu.Unlock()
	return ws, nil
}

// presentPages returns the sorted file page indexes of QEMU's mapping of
// dev whose page-table entries are present or swapped
// (/proc/PID/pagemap bits 63 and 62): the pages the guest (or QEMU) has
// touched, read or written (a written page is a private copy now, but its
// file page was read first).
func presentPages(pid int, dev string, size int64) ([]uint64, error) {
	start, end, pgoff, err := findMapping(pid, dev)
	if err != nil {
		return nil, err
	}
	if end-start != uint64(size) || pgoff != 0 {
		return nil, fmt.Errorf("mapping of %s in pid %d is [%#x, %#x) at offset %#x, want %d bytes at 0", dev, pid, start, end, pgoff, size)
	}
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/pagemap")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const batch = 1 << 14
	buf := make([]byte, 8*batch)
	var pages []uint64
	n := (end - start) / wsfPage
	for i := uint64(0); i < n; i += batch {
		k := min(batch, n-i)
		if _, err := f.ReadAt(buf[:8*k], int64((start/wsfPage+i)*8)); err != nil {
			return nil, fmt.Errorf("read pagemap of pid %d: %w", pid, err)
		}
		for j := range k {
			if binary.LittleEndian.Uint64(buf[8*j:])&(3<<62) != 0 {
				pages = append(pages, i+j)
			}
		}
	}
	return pages, nil
}

// findMapping finds pid's mapping of path in /proc/PID/maps.
func findMapping(pid int, path string) (start, end, pgoff uint64, err error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/maps")
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || fs[5] != path {
			continue
		}
		lo, hi, _ := strings.Cut(fs[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		off, err3 := strconv.ParseUint(fs[2], 16, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return 0, 0, 0, fmt.Errorf("parse /proc/%d/maps: %w", pid, err)
		}
		return start, end, off, nil
	}
	if err := sc.Err(); err != nil {
		return 0, 0, 0, err
	}
	return 0, 0, 0, fmt.Errorf("pid %d has no mapping of %s", pid, path)
}

// procFaults reads a process's minor and major fault counters.
func procFaults(pid int) (maj, mnr int64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	// After "pid (comm) ": state ppid pgrp session tty_nr tpgid flags
	// minflt cminflt majflt ...
	fs := strings.Fields(string(b[i+1:]))
	if len(fs) < 10 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	mnr, err1 := strconv.ParseInt(fs[7], 10, 64)
	maj, err2 := strconv.ParseInt(fs[9], 10, 64)
	return maj, mnr, errors.Join(err1, err2)
}

// procReadBytes reads the bytes a process caused to be read from storage
// (/proc/PID/io read_bytes: page-cache misses of its faults included).
func procReadBytes(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "read_bytes: "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("no read_bytes in /proc/%d/io", pid)
}

// qemuCommand is QEMU's command: under the no-hugepage launcher for a
// record restore (the advice would make the kernel read 4 MiB around
// every fault of the record device), as is otherwise.
func (s *Sandbox) qemuCommand(path string, args []string) *exec.Cmd {
	if s.restore != nil && s.restore.reap.dev != nil {
		return launcherCommand(path, args...)
	}
	return exec.Command(path, args...)
}

// mincorePages counts the pages of path's first size bytes in the page
// cache with mincore(2) (the measurement tool beside cachestat, for
// devices).
func mincorePages(path string, size int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, err
	}
	defer unix.Munmap(m)
	v := make([]byte, (size+wsfPage-1)/wsfPage)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&v[0]))); errno != 0 {
		return 0, errno
	}
	var n int64
	for _, b := range v {
		n += int64(b & 1)
	}
	return n, nil
}

// prefetchPad is the alignment a prefetch widens every run to. A restore
// touches a few pages its record did not (the guest is not
// deterministic); each such miss is a major fault that reads 4 MiB
// around it (QEMU's hugepage advice, kept outside record restores). In
// BenchmarkReapRestore (two interleaved runs, testfn / helloworld) the
// exact WS (9–11 MiB) left 8.2–8.6 / 9.7–14.2 major faults per restore,
// 64 KiB windows (30–35 MiB) 0.9–1.5 / 2.2–3.5, 256 KiB windows (44–49
// MiB, read in 73–106 ms, still hidden behind QEMU's start) 0.1–0.2 /
// 0.8; restore → first reply did not differ beyond the noise. The WS file
// keeps the exact 4 KiB set.
const prefetchPad = 256 << 10

// padRuns widens runs to pad-aligned windows within size, merging those
// that meet.
func padRuns(runs []wsRun, pad, size uint64) []wsRun {
	var out []wsRun
	for _, r := range runs {
		lo := r.Off / pad * pad
		hi := min((r.Off+r.Len+pad-1)/pad*pad, size)
		if n := len(out); n > 0 && lo <= out[n-1].Off+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Len, hi-out[n-1].Off)
			continue
		}
		out = append(out, wsRun{lo, hi - lo})
	}
	return out
}
