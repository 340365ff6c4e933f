package image

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	bolt "go.etcd.io/bbolt"
)

// TestHammerPullRemove runs pulls, re-tags, removes and lookups of a few
// images from many goroutines, then checks the store's invariants: every
// reference names a record, every record has its directory with the
// expected content, and no directory or temporary file is left without a
// record.
func TestHammerPullRemove(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	const nImages, workers, ops = 4, 8, 40
	var digests []string
	var content = map[string]string{}
	for i := range nImages {
		body := fmt.Sprintf("image %d", i)
		img := buildImage(t, v1.Config{}, layer(t, file("id", body, 0o644)))
		digests = append(digests, imageDigest(t, img))
		content[imageDigest(t, img)] = body
		push(t, host, fmt.Sprintf("fn/h%d:v1", i), img)
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers*ops)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range ops {
				i := rng.IntN(nImages)
				src := fmt.Sprintf("%s/fn/h%d:v1", host, i)
				var err error
				switch rng.IntN(5) {
				case 0, 1:
					_, err = e.svc.Pull(ctx, src)
				case 2:
					// A second reference by digest (served from the store when held).
					_, err = e.svc.Pull(ctx, fmt.Sprintf("%s/fn/h%d@%s", host, i, digests[i]))
				case 3:
					err = e.svc.Remove(ctx, src)
					if rng.IntN(2) == 0 {
						err = e.svc.Remove(ctx, digests[i])
					}
				case 4:
					var img Image
					img, err = e.svc.Get(ctx, src)
					if err == nil && img.Digest != digests[i] {
						err = fmt.Errorf("Get(%s) = %s, want %s", src, img.Digest, digests[i])
					}
				}
				if err != nil && !errors.Is(err, ErrNotFound) {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("op failed: %v", err)
	}

	// Invariants.
	recorded := map[string]bool{}
	if err := e.svc.db.View(func(tx *bolt.Tx) error {
		if err := images(tx).ForEach(func(k, _ []byte) error { recorded[string(k)] = true; return nil }); err != nil {
			return err
		}
		return refsB(tx).ForEach(func(k, v []byte) error {
			if !recorded[string(v)] {
				t.Errorf("reference %s names unrecorded digest %s", k, v)
			}
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	for d := range recorded {
		if s := readFile(t, filepath.Join(e.svc.digestDir(d), "rootfs", "id")); s != content[d] {
			t.Errorf("digest %s holds %q, want %q", d, s, content[d])
		}
	}
	dirs, err := os.ReadDir(filepath.Join(e.svc.Root(), "digests", "sha256"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if !recorded["sha256:"+d.Name()] {
			t.Errorf("directory of unrecorded digest %s left behind", d.Name())
		}
	}
	e.checkTmpEmpty(t)
	t.Logf("%d unpacks, %d digests recorded at the end", e.svc.Unpacks(), len(recorded))
}
