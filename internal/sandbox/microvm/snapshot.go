package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/microvm/agentproto"
	"vhive.dev/vhive/internal/sandbox"
)

// Files of a snapshot directory (the snapshot store lists and hashes them).
const (
	// SnapshotMeta is what a restore needs besides the state: the QEMU
	// version, kernel, initramfs, disk and memory size of the source.
	SnapshotMeta = "microvm.json"
	// SnapshotState is QEMU's device state (migration stream; the RAM is
	// not in it: x-ignore-shared).
	SnapshotState = "state"
	// SnapshotMemory is the guest RAM, copied from the source's
	// memory-backend-file.
	SnapshotMemory = "mem"
)

// snapshotMeta is SnapshotMeta's content. A restore needs the same QEMU
// version, accelerator, kernel and initramfs (by digest) and machine (the
// device-relevant part of QEMU's command line) as the snapshot's source;
// readMeta refuses any difference with sandbox.ErrBadSnapshot.
type snapshotMeta struct {
	QEMUVersion     string `json:"qemu_version"`
	Accel           string `json:"accel"`
	MemoryMiB       int    `json:"memory_mib"`
	CPUs            int    `json:"cpus"`
	Vmlinuz         string `json:"vmlinuz"`
	KernelSHA256    string `json:"kernel_sha256"`
	Initramfs       string `json:"initramfs"`
	InitramfsSHA256 string `json:"initramfs_sha256"`
	// Machine is machineConfig of the source.
	Machine     string `json:"machine"`
	Disk        string `json:"disk"`
	ImageDigest string `json:"image_digest"`
	Port        int    `json:"port"`
}

// machineConfig is the device-relevant part of the QEMU command line of an
// instance with memMiB of RAM and cpus vCPUs: machine, accelerator, RAM,
// vCPUs and devices, with the per-instance paths, names, the kernel
// command line and the accelerator's options (TCG's buffer size) left out. A migration stream loads only into the same.
func (b *Backend) machineConfig(memMiB, cpus int) string {
	ph := &Sandbox{b: b, id: "ID", dir: "DIR", disk: "DISK", agentSck: "AGENT", qmpSock: "QMP", memMiB: memMiB, cpus: cpus}
	args := ph.qemuArgs("MEM", "KERNEL", "INITRD", false)
	var out []string
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "-name", "-kernel", "-initrd", "-append", "-serial":
			i++ // per-instance values
			continue
		case "-accel":
			// The accelerator alone: its options (TCG's tb-size) do not
			// change what the guest sees.
			if i+1 < len(args) {
				out = append(out, args[i], strings.SplitN(args[i+1], ",", 2)[0])
			}
			i++
			continue
		}
		out = append(out, args[i])
	}
	return strings.Join(out, " ")
}

// Snapshot writes the VM's state into dir and leaves the instance running:
// QMP stop, migrate (x-ignore-shared) into dir/state, copy of the RAM file
// into dir/mem (sparse, or a reflink where the file system has them), cont.
// The source keeps running on its own RAM file; the snapshot's copy is
// never written again, so any number of restores can map it.
func (s *Sandbox) Snapshot(ctx context.Context, dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("microvm: snapshot of sandbox %q: %w", s.id, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("microvm: snapshot of sandbox %q: %q is not a directory", s.id, dir)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.qmp == nil || s.exited() {
		return fmt.Errorf("microvm: snapshot of sandbox %q: not running", s.id)
	}
	if s.restore != nil {
		// Its RAM is a private mapping of another snapshot's file plus
		// anonymous copies: no file holds it.
		return fmt.Errorf("microvm: snapshot of restored sandbox %q: %w", s.id, sandbox.ErrNotSupported)
	}
	c := s.qmp
	if _, err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}); err != nil {
		return fmt.Errorf("microvm: snapshot of sandbox %q: %w", s.id, err)
	}
	if _, err := c.Execute(ctx, "stop", nil); err != nil {
		return fmt.Errorf("microvm: snapshot of sandbox %q: %w", s.id, err)
	}
	resume := func() error {
		_, err := c.Execute(context.WithoutCancel(ctx), "cont", nil)
		return err
	}
	state := filepath.Join(dir, SnapshotState)
	if err := migrateTo(ctx, c, state); err != nil {
		return errors.Join(fmt.Errorf("microvm: snapshot of sandbox %q: %w", s.id, err), resume())
	}
	if err := copySparse(s.b.MemoryFile(s.id), filepath.Join(dir, SnapshotMemory)); err != nil {
		return errors.Join(fmt.Errorf("microvm: snapshot of sandbox %q: copy RAM: %w", s.id, err), resume())
	}
	if err := resume(); err != nil {
		return fmt.Errorf("microvm: snapshot of sandbox %q: resume: %w", s.id, err)
	}
	a := s.b.cfg.Assets
	meta := snapshotMeta{
		QEMUVersion: a.QEMUVersion, Accel: s.b.cfg.Accel, MemoryMiB: s.memMiB, CPUs: s.cpus,
		Vmlinuz: a.Vmlinuz, KernelSHA256: s.b.kernelSHA256, Initramfs: a.Initramfs, InitramfsSHA256: s.b.initramfsSHA256,
		Machine: s.b.machineConfig(s.memMiB, s.cpus),
		Disk:    s.disk, ImageDigest: s.spec.ImageDigest, Port: s.spec.Port,
	}
	data, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, SnapshotMeta), data, 0o644); err != nil {
		return fmt.Errorf("microvm: snapshot of sandbox %q: %w", s.id, err)
	}
	return nil
}

// shellQuote quotes p for QEMU's exec: migration URI (run by /bin/sh).
func shellQuote(p string) string {
	return "'" + strings.ReplaceAll(p, "'", `'\''`) + "'"
}

// migrateTo runs an outgoing migration into file and waits for its end.
// (QEMU 7.2 has no file: URI; exec:cat works on every version.)
func migrateTo(ctx context.Context, c qmpClient, file string) error {
	if _, err := c.Execute(ctx, "migrate", map[string]any{"uri": "exec:cat > " + shellQuote(file)}); err != nil {
		return err
	}
	return waitMigration(ctx, c, "query-migrate")
}

type qmpClient interface {
	Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error)
}

func waitMigration(ctx context.Context, c qmpClient, query string) error {
	for {
		raw, err := c.Execute(ctx, query, nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("%s: %w", query, err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// copySparse copies src to dst: a reflink (FICLONE) if the file system can,
// else the data extents only (SEEK_DATA/SEEK_HOLE), so that the untouched
// part of guest RAM stays a hole.
func copySparse(src, dst string) (retErr error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if err := out.Close(); retErr == nil {
			retErr = err
		}
		if retErr != nil {
			os.Remove(dst)
		}
	}()
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		return nil
	}
	size := fi.Size()
	var off int64
	for off < size {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				break // only a hole is left
			}
			return fmt.Errorf("seek data in %s: %w", src, err)
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole in %s: %w", src, err)
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			return fmt.Errorf("copy %s: %w", src, err)
		}
		off = hole
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	return out.Sync()
}

// restoreParams is what a restore resumes from.
type restoreParams struct {
	dir  string
	meta snapshotMeta
	mode sandbox.MemoryMode
	// reap is the record or prefetch state of a REAP restore (reap.go).
	reap reapState
}

// memPath is what QEMU maps as guest RAM: the snapshot's memory file, or
// the record device over it.
func (rp *restoreParams) memPath() string {
	if rp.reap.dev != nil {
		return rp.reap.dev.path
	}
	return filepath.Join(rp.dir, SnapshotMemory)
}

// memProps maps the snapshot's RAM file privately: writes go to anonymous
// copies and the file is never changed. QEMU ≥ 8.2 opens it read-only
// (readonly=on,rom=off); 7.2 has no rom= and opens it read-write, but
// still maps it MAP_PRIVATE (share=off).
func (rp *restoreParams) memProps(b *Backend) string {
	p := "mem-path=" + rp.memPath() + ",share=off"
	if b.qemuMajor > 8 || (b.qemuMajor == 8 && b.qemuMinor >= 2) {
		p += ",readonly=on,rom=off"
	}
	return p
}

// Restore starts a new VM from a snapshot taken by Snapshot, in its own
// netns: QEMU with -incoming defer on a private mapping of the snapshot's
// RAM, migrate-incoming from the state file, cont, then the resume
// handshake (the agent sets the clock and reseeds the RNG; the guest keeps
// its address, the same in every guest, see net.go). MemoryEager reads the
// whole RAM file into the page cache first; MemoryLazy lets guest accesses
// fault pages in; MemoryRecord does too and records the pages touched
// until FinishRecord into opts.WorkingSet; MemoryPrefetch reads the runs of
// opts.WorkingSet into the page cache while QEMU starts (reap.go). The
// returned sandbox is running; Start is a no-op.
func (b *Backend) Restore(ctx context.Context, spec sandbox.Spec, dir string, opts sandbox.RestoreOptions) (_ sandbox.Sandbox, retErr error) {
	mode := opts.Mode
	if mode == "" {
		mode = sandbox.MemoryEager
	}
	switch mode {
	case sandbox.MemoryEager, sandbox.MemoryLazy, sandbox.MemoryRecord, sandbox.MemoryPrefetch:
	default:
		return nil, fmt.Errorf("microvm: restore of %q in memory mode %q: %w", spec.ID, mode, sandbox.ErrNotSupported)
	}
	if (mode == sandbox.MemoryRecord || mode == sandbox.MemoryPrefetch) && opts.WorkingSet == "" {
		return nil, fmt.Errorf("microvm: restore of %q in memory mode %q: no working-set path", spec.ID, mode)
	}
	meta, err := b.readMeta(dir, spec)
	if err != nil {
		return nil, err
	}
	rp := &restoreParams{dir: dir, meta: meta, mode: mode}
	rp.reap.memPath, rp.reap.wsPath = filepath.Join(dir, SnapshotMemory), opts.WorkingSet
	switch mode {
	case sandbox.MemoryRecord:
		dev, err := attachRecordDevice(rp.reap.memPath)
		if err != nil {
			// Restore lazily; FinishRecord reports that nothing was
			// recorded, and the next cold start tries again.
			rp.reap.recordErr = err
			b.log.Warn("REAP record: no record device; restoring lazily without recording", "id", spec.ID, "err", err)
		} else {
			rp.reap.dev = dev
		}
	case sandbox.MemoryPrefetch:
		rp.reap.startPrefetch(ctx, b.log, spec.ID, b.reapPad)
	}
	s, err := b.prepare(ctx, spec, rp)
	if err != nil {
		rp.reap.release()
		return nil, err
	}
	defer func() {
		if retErr != nil {
			_ = s.Stop(context.WithoutCancel(ctx))
		}
	}()
	stages := map[string]time.Duration{}
	t := time.Now()
	if mode == sandbox.MemoryEager {
		if err := readAll(filepath.Join(dir, SnapshotMemory)); err != nil {
			return nil, fmt.Errorf("microvm: restore of %q: read the RAM file: %w", spec.ID, err)
		}
		stages["ReadMemory"] = time.Since(t)
		t = time.Now()
	}
	s.mu.Lock()
	s.started = true
	err = s.launch(ctx)
	if err == nil {
		stages["LaunchVMM"] = time.Since(t)
		t = time.Now()
		err = s.incoming(ctx)
		stages["LoadState"] = time.Since(t)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	t = time.Now()
	e, err := entropy()
	if err != nil {
		return nil, err
	}
	// The guest keeps its address: every guest has the same (net.go).
	res := &agentproto.Resume{TimeUnixNano: time.Now().UnixNano(), Entropy: e}
	if err := s.handshake(ctx, agentproto.Message{Type: agentproto.TypeResume, Resume: res}); err != nil {
		return nil, err
	}
	stages["ResumeAgent"] = time.Since(t)
	s.mu.Lock()
	s.stages = stages
	s.mu.Unlock()
	return s, nil
}

// RestoreStats implements sandbox.RestoreReporter: the restore's stages
// (ReadMemory for eager restores, LaunchVMM, LoadState — migrate-incoming
// until the guest is paused, cont included — and ResumeAgent, the clock
// and entropy handshake; for a prefetch, FetchState — reading the
// WS into the page cache, from the restore's start — and PrefetchWait, how
// long cont waited for it) and page statistics: QEMU's MajorFaults and
// MinorFaults since cont (live; Unique = MajorFaults) and VMMReadBytes
// (what its faults read from storage since cont), and for REAP
// RecPages and RecRegions (pages and runs of the WS: recorded, once
// FinishRecord ran, or prefetched), BytesRead (prefetched), and
// PrefetchFallback (1 when the WS was not usable).
func (s *Sandbox) RestoreStats() sandbox.RestoreResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	pid := 0
	if s.cmd != nil && !s.exited() {
		pid = s.cmd.Process.Pid
	}
	res := sandbox.RestoreResult{Stages: maps.Clone(s.stages), Pages: map[string]int64{}}
	if res.Stages == nil {
		res.Stages = map[string]time.Duration{}
	}
	if s.restore != nil {
		st, pg := s.restore.reap.stats(pid)
		maps.Copy(res.Stages, st)
		res.Pages = pg
	}
	return res
}

// incoming loads the device state and resumes the guest (s.mu held).
func (s *Sandbox) incoming(ctx context.Context) error {
	c := s.qmp
	if _, err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}); err != nil {
		return s.failure("restore", err)
	}
	uri := "exec:cat " + shellQuote(filepath.Join(s.restore.dir, SnapshotState))
	if _, err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}); err != nil {
		return s.failure("restore", err)
	}
	// The source was stopped when it was saved, so the guest stays paused
	// once the state is in; wait for that, then run it.
	for {
		raw, err := c.Execute(ctx, "query-status", nil)
		if err != nil {
			return s.failure("restore", err)
		}
		var st struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return s.failure("restore", err)
		}
		if st.Status != "inmigrate" {
			if st.Status != "paused" && st.Status != "running" {
				return s.failure("restore", fmt.Errorf("VM status %q after the incoming migration", st.Status))
			}
			break
		}
		select {
		case <-ctx.Done():
			return s.failure("restore", ctx.Err())
		case <-s.waited:
			return s.failure("restore", errors.New("QEMU exited during the incoming migration"))
		case <-time.After(2 * time.Millisecond):
		}
	}
	s.restore.reap.beforeCont(s.cmd.Process.Pid)
	if _, err := c.Execute(ctx, "cont", nil); err != nil {
		return s.failure("restore", err)
	}
	return nil
}

// readMeta loads and checks a snapshot's metadata against this backend and
// spec. Every refusal wraps sandbox.ErrBadSnapshot and names what differs:
// the field, the snapshot's value and the current one.
func (b *Backend) readMeta(dir string, spec sandbox.Spec) (snapshotMeta, error) {
	var m snapshotMeta
	bad := func(format string, args ...any) error {
		return fmt.Errorf("microvm: restore of %q from %s: %w: %s", spec.ID, dir, sandbox.ErrBadSnapshot, fmt.Sprintf(format, args...))
	}
	data, err := os.ReadFile(filepath.Join(dir, SnapshotMeta))
	if err != nil {
		return m, bad("no microVM snapshot: %v", err)
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, bad("%s: %v", SnapshotMeta, err)
	}
	mem, cpus := b.memMiB(spec), b.vcpus(spec)
	for _, c := range []struct{ field, snap, cur string }{
		{"qemu_version", m.QEMUVersion, b.cfg.Assets.QEMUVersion},
		{"accel", m.Accel, b.cfg.Accel},
		{"kernel_sha256", m.KernelSHA256, b.kernelSHA256},
		{"initramfs_sha256", m.InitramfsSHA256, b.initramfsSHA256},
		{"memory_mib", strconv.Itoa(m.MemoryMiB), strconv.Itoa(mem)},
		{"cpus", strconv.Itoa(m.CPUs), strconv.Itoa(cpus)},
		{"machine", m.Machine, b.machineConfig(mem, cpus)},
	} {
		if c.snap != c.cur {
			if c.field == "machine" {
				return m, bad("machine differs: %s", firstDifference(c.snap, c.cur))
			}
			if c.snap == "" {
				c.snap = "(none)"
			}
			return m, bad("%s differs: snapshot %q, current %q", c.field, c.snap, c.cur)
		}
	}
	if spec.ImageDigest != "" && spec.ImageDigest != m.ImageDigest {
		return m, bad("image_digest differs: snapshot %q, current %q", m.ImageDigest, spec.ImageDigest)
	}
	for _, p := range []string{m.Disk, filepath.Join(dir, SnapshotState), filepath.Join(dir, SnapshotMemory)} {
		if _, err := os.Stat(p); err != nil {
			return m, bad("%v", err)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, SnapshotMemory))
	if err != nil {
		return m, bad("%v", err)
	}
	if fi.Size() != int64(m.MemoryMiB)<<20 {
		return m, bad("RAM file is %d bytes, want %d MiB", fi.Size(), m.MemoryMiB)
	}
	return m, nil
}

// firstDifference describes where two machine configurations part: the
// first differing argument of each.
func firstDifference(snap, cur string) string {
	a, b := strings.Fields(snap), strings.Fields(cur)
	for i := 0; i < max(len(a), len(b)); i++ {
		var x, y string
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			prev := ""
			if i > 0 && i-1 < len(b) {
				prev = " after " + b[i-1]
			}
			return fmt.Sprintf("argument %d%s is %q in the snapshot, %q here (snapshot: %q)", i+1, prev, x, y, snap)
		}
	}
	return "none"
}

// readAll reads the data extents of path (into the page cache).
func readAll(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	_, err = io.CopyBuffer(io.Discard, f, make([]byte, 1<<20))
	return err
}
