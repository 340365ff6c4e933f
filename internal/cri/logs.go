package cri

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// logWriter writes a container's output in the CRI log format kubelet reads
// (`kubectl logs`): one line per record,
//
//	<RFC3339Nano timestamp> <stdout|stderr> <F|P> <content>\n
//
// F marks a full line, P a partial one (a line longer than maxLogLine is cut
// into P records ending with one F record).
type logWriter struct {
	path string

	mu     sync.Mutex
	f      *os.File // nil when path is ""
	closed bool

	amu      sync.Mutex
	attached map[*attachment]struct{}
}

const maxLogLine = 16 << 10

func newLogWriter(path string) (*logWriter, error) {
	w := &logWriter{path: path}
	if path == "" {
		return w, nil
	}
	if err := w.open(); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *logWriter) open() error {
	if err := os.MkdirAll(filepath.Dir(w.path), 0o755); err != nil {
		return fmt.Errorf("create log dir for %q: %w", w.path, err)
	}
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log %q: %w", w.path, err)
	}
	w.f = f
	return nil
}

// reopen closes and reopens the file (after kubelet rotated it).
func (w *logWriter) reopen() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.path == "" || w.closed {
		return nil
	}
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
	return w.open()
}

func (w *logWriter) record(stream string, partial bool, line []byte) {
	tag := "F"
	if partial {
		tag = "P"
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return
	}
	var b bytes.Buffer
	b.Grow(len(line) + 48)
	b.WriteString(time.Now().UTC().Format(time.RFC3339Nano))
	b.WriteByte(' ')
	b.WriteString(stream)
	b.WriteByte(' ')
	b.WriteString(tag)
	b.WriteByte(' ')
	b.Write(line)
	b.WriteByte('\n')
	_, _ = w.f.Write(b.Bytes())
}

// copyFrom reads r until EOF, writing records tagged stream ("stdout" or
// "stderr") and passing the raw bytes on to attached clients at once. It is
// run by one goroutine per stream.
func (w *logWriter) copyFrom(stream string, r io.Reader) {
	buf := make([]byte, 32<<10)
	var line []byte // pending partial line
	for {
		n, err := r.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			w.fanout(stream, chunk)
			for len(chunk) > 0 {
				i := bytes.IndexByte(chunk, '\n')
				if i < 0 {
					line = append(line, chunk...)
					if len(line) >= maxLogLine {
						w.record(stream, true, line)
						line = line[:0]
					}
					break
				}
				line = append(line, chunk[:i]...)
				w.record(stream, false, line)
				line = line[:0]
				chunk = chunk[i+1:]
			}
		}
		if err != nil {
			if len(line) > 0 {
				w.record(stream, false, line)
			}
			return
		}
	}
}

// attachment is one attached client's output.
type attachment struct {
	stdout, stderr io.Writer
}

// attach adds a client receiving the container's output from now on; the
// returned func detaches it.
func (w *logWriter) attach(a *attachment) (detach func()) {
	w.amu.Lock()
	defer w.amu.Unlock()
	if w.attached == nil {
		w.attached = map[*attachment]struct{}{}
	}
	w.attached[a] = struct{}{}
	return func() {
		w.amu.Lock()
		defer w.amu.Unlock()
		delete(w.attached, a)
	}
}

func (w *logWriter) fanout(stream string, b []byte) {
	w.amu.Lock()
	defer w.amu.Unlock()
	for a := range w.attached {
		dst := a.stdout
		if stream == "stderr" {
			dst = a.stderr
		}
		if dst != nil {
			_, _ = dst.Write(b)
		}
	}
}

// message writes one line of vhive's own (e.g. why a function sandbox
// exited) to stderr.
func (w *logWriter) message(format string, args ...any) {
	w.record("stderr", false, []byte(fmt.Sprintf(format, args...)))
}

func (w *logWriter) close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}
