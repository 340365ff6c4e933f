package memory

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFetchStopsAtFirstBadChunk: with several verifiers checking chunks
// out of order, a fetch of a WS file with one corrupt chunk ends with that
// chunk's error and with exactly the chunks before it verified (the
// installer takes those), whichever verifier gets where first; a clean
// file verifies whole.
func TestFetchStopsAtFirstBadChunk(t *testing.T) {
	const (
		pageSize = 4096
		chunk    = 256 << 10
		dataLen  = 24 << 20 // 96 chunks
		memSize  = 32 << 20
	)
	data := make([]byte, dataLen)
	rand.NewChaCha8([32]byte{3}).Read(data)
	clean := encodeWorkingSet(pageSize, memSize, []Run{{Offset: 0, Length: dataLen}}, data, chunk)
	dataOff := binary.LittleEndian.Uint64(clean[32:])
	chunks := dataLen / chunk
	m, err := NewManager(Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	dir := t.TempDir()
	n := 0
	fetch := func(file []byte) (verified int, ferr error) {
		n++
		path := filepath.Join(dir, fmt.Sprintf("ws%d", n)) // a new file: no shared fetch
		if err := os.WriteFile(path, file, 0o600); err != nil {
			t.Fatal(err)
		}
		f, _, err := m.fetch(path, memSize)
		if err != nil {
			t.Fatal(err)
		}
		defer m.releaseFetch(f)
		f.mu.Lock()
		defer f.mu.Unlock()
		for f.fetchedAt.IsZero() {
			f.cond.Wait()
		}
		return f.verified, f.err
	}

	if v, err := fetch(clean); v != chunks || err != nil {
		t.Fatalf("clean file: %d of %d chunks verified, %v", v, chunks, err)
	}
	for _, bad := range []int{0, 1, 37, chunks - 1} {
		for i := range 8 {
			file := append([]byte(nil), clean...)
			file[dataOff+uint64(bad*chunk)+uint64(i*4099)%chunk] ^= 0x40
			v, err := fetch(file)
			if v != bad || !errors.Is(err, ErrBadWorkingSet) || !strings.Contains(err.Error(), fmt.Sprintf("chunk %d ", bad)) {
				t.Fatalf("chunk %d corrupt (try %d): %d chunks verified, err %v; want %d verified and chunk %d's error", bad, i, v, err, bad, bad)
			}
		}
	}
}
