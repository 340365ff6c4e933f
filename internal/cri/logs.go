package cri

import (
	"bufio"
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
// "stderr"). It is run by one goroutine per stream.
func (w *logWriter) copyFrom(stream string, r io.Reader) {
	br := bufio.NewReaderSize(r, maxLogLine)
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case err == nil:
			w.record(stream, false, bytes.TrimSuffix(line, []byte{'\n'}))
		case err == bufio.ErrBufferFull:
			w.record(stream, true, line)
		default:
			if len(line) > 0 {
				w.record(stream, false, line)
			}
			return
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
