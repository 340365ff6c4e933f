// Command aes encrypts with AES-256-CTR, like vHive's aes function.
//
// The payloads "record" and "replay" select the built-in input sets 1 and 2
// (16 KiB and 64 KiB of fixed pseudo-random bytes), encrypted under a fixed
// IV; the reply is "aes-ctr set=<n> bytes=<len> sha256=<hex of ciphertext>",
// the same in every instance. Any other payload is encrypted as given under a
// fresh random IV; the reply is hex(IV || ciphertext).
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"

	"vhive.dev/vhive/functions/sdk"
)

// key is the function's fixed demo key (32 bytes: AES-256). Not a secret.
var key = []byte("vhive-example-aes-ctr-key-32-by!")

type aesFn struct {
	block cipher.Block
	sets  [2][]byte
}

func newAES() (*aesFn, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("aes: cipher: %w", err)
	}
	return &aesFn{block: block, sets: [2][]byte{inputSet(1, 16<<10), inputSet(2, 64<<10)}}, nil
}

// inputSet is n deterministic pseudo-random bytes seeded by seed.
func inputSet(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed
	for i := range b {
		if i%8 == 0 {
			x = splitmix64(x)
		}
		b[i] = byte(x >> (8 * (i % 8)))
	}
	return b
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	z := x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func (f *aesFn) encrypt(iv, plain []byte) []byte {
	out := make([]byte, len(plain))
	cipher.NewCTR(f.block, iv).XORKeyStream(out, plain)
	return out
}

func (f *aesFn) handle(_ context.Context, payload string) (string, error) {
	set := 0
	switch payload {
	case "record":
		set = 1
	case "replay":
		set = 2
	}
	if set != 0 {
		ct := f.encrypt(make([]byte, aes.BlockSize), f.sets[set-1])
		sum := sha256.Sum256(ct)
		return fmt.Sprintf("aes-ctr set=%d bytes=%d sha256=%x", set, len(ct), sum), nil
	}
	iv := make([]byte, aes.BlockSize)
	if _, err := rand.Read(iv); err != nil {
		return "", fmt.Errorf("aes: random IV: %w", err)
	}
	return hex.EncodeToString(append(iv, f.encrypt(iv, []byte(payload))...)), nil
}

func mustNew() *aesFn {
	f, err := newAES()
	if err != nil {
		slog.Error("start-up failed", "err", err)
		os.Exit(1)
	}
	return f
}

func main() { sdk.Run(mustNew().handle) }
