package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"
)

func TestAESPayloadRoundTrip(t *testing.T) {
	f, err := newAES()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"hello", "", "a longer payload that spans several AES blocks........"} {
		out, err := f.handle(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := hex.DecodeString(out)
		if err != nil || len(raw) != aes.BlockSize+len(p) {
			t.Fatalf("reply %q: %v (len %d)", out, err, len(raw))
		}
		block, _ := aes.NewCipher(key)
		plain := make([]byte, len(p))
		cipher.NewCTR(block, raw[:aes.BlockSize]).XORKeyStream(plain, raw[aes.BlockSize:])
		if string(plain) != p {
			t.Errorf("decrypt = %q, want %q", plain, p)
		}
	}
	a, _ := f.handle(context.Background(), "same")
	b, _ := f.handle(context.Background(), "same")
	if a == b {
		t.Error("two encryptions share an IV")
	}
}

func TestAESInputSets(t *testing.T) {
	f, err := newAES()
	if err != nil {
		t.Fatal(err)
	}
	for set, payload := range map[int]string{1: "record", 2: "replay"} {
		got, err := f.handle(context.Background(), payload)
		if err != nil {
			t.Fatal(err)
		}
		// Independent computation with the standard library.
		block, _ := aes.NewCipher(key)
		in := f.sets[set-1]
		ct := make([]byte, len(in))
		cipher.NewCTR(block, make([]byte, aes.BlockSize)).XORKeyStream(ct, in)
		want := fmt.Sprintf("aes-ctr set=%d bytes=%d sha256=%x", set, len(in), sha256.Sum256(ct))
		if got != want {
			t.Errorf("%s: %q, want %q", payload, got, want)
		}
		again, _ := f.handle(context.Background(), payload)
		if again != got {
			t.Errorf("%s is not deterministic", payload)
		}
	}
	if len(f.sets[0]) != 16<<10 || len(f.sets[1]) != 64<<10 || string(f.sets[0][:64]) == string(f.sets[1][:64]) {
		t.Error("input sets have the wrong sizes or are equal")
	}
}

func BenchmarkAESRecord(b *testing.B) {
	f, _ := newAES()
	b.SetBytes(16 << 10)
	for b.Loop() {
		if _, err := f.handle(context.Background(), "record"); err != nil {
			b.Fatal(err)
		}
	}
}
