package image

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Images are cached by manifest digest, so every byte stored under a digest
// must be proven to belong to it: otherwise a forged archive (Import) could
// plant content that a later Pull of the genuine digest would find in the
// cache. go-containerregistry verifies registry blobs but not OCI layout
// blobs, so the service verifies the manifest, the config and every layer
// itself, for every source.

// checkDigest verifies that b hashes to want (sha256 only).
func checkDigest(what string, b []byte, want v1.Hash) error {
	if want.Algorithm != "sha256" {
		return fmt.Errorf("%s: unsupported digest algorithm %q: %w", what, want.Algorithm, ErrInvalid)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != want.Hex {
		return fmt.Errorf("%s: content has digest sha256:%s, want %s: %w", what, got, want, ErrInvalid)
	}
	return nil
}

// hashReader hashes what is read through it.
type hashReader struct {
	r io.Reader
	h hash.Hash
}

func (h *hashReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	return n, err
}

// layerReader decompresses a layer blob (gzip, zstd or plain tar, told by
// its magic bytes) while hashing the compressed bytes.
type layerReader struct {
	io.Reader // decompressed stream
	blob      io.ReadCloser
	hr        *hashReader
	br        *bufio.Reader
	zr        *gzip.Reader
	zd        *zstd.Decoder
	want      v1.Hash
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

func openLayer(l v1.Layer, want v1.Hash) (*layerReader, error) {
	if want.Algorithm != "sha256" {
		return nil, fmt.Errorf("unsupported digest algorithm %q: %w", want.Algorithm, ErrInvalid)
	}
	blob, err := l.Compressed()
	if err != nil {
		return nil, err
	}
	lr := &layerReader{blob: blob, want: want, hr: &hashReader{r: blob, h: sha256.New()}}
	lr.br = bufio.NewReaderSize(lr.hr, 64<<10)
	magic, _ := lr.br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		lr.zr, err = gzip.NewReader(lr.br)
		lr.Reader = lr.zr
	case bytes.HasPrefix(magic, zstdMagic):
		lr.zd, err = zstd.NewReader(lr.br)
		lr.Reader = lr.zd
	default:
		lr.Reader = lr.br
	}
	if err != nil {
		blob.Close()
		return nil, fmt.Errorf("decompress: %v: %w", err, ErrInvalid)
	}
	return lr, nil
}

// verify checks the digest once the decompressed stream was read to its end.
func (l *layerReader) verify() error {
	// Bytes after the compressed stream, if any, are part of the blob.
	if _, err := io.Copy(io.Discard, io.LimitReader(l.br, 1<<20)); err != nil {
		return err
	}
	if got := hex.EncodeToString(l.hr.h.Sum(nil)); got != l.want.Hex {
		return fmt.Errorf("content has digest sha256:%s, want %s: %w", got, l.want, ErrInvalid)
	}
	return nil
}

func (l *layerReader) Close() error {
	if l.zr != nil {
		l.zr.Close()
	}
	if l.zd != nil {
		l.zd.Close()
	}
	return l.blob.Close()
}
