package image

import (
	"encoding/json"
	"fmt"
	"sort"

	bolt "go.etcd.io/bbolt"
)

// Bucket names; the schema is drawn in the package doc.
var (
	bucketV1     = []byte("v1")
	bucketRefs   = []byte("refs")
	bucketImages = []byte("images")
)

func refsB(tx *bolt.Tx) *bolt.Bucket  { return tx.Bucket(bucketV1).Bucket(bucketRefs) }
func images(tx *bolt.Tx) *bolt.Bucket { return tx.Bucket(bucketV1).Bucket(bucketImages) }

func getRecord(tx *bolt.Tx, dgst string) (*record, error) {
	v := images(tx).Get([]byte(dgst))
	if v == nil {
		return nil, fmt.Errorf("image: digest %s: %w", dgst, ErrNotFound)
	}
	var r record
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("image: record of %s is corrupt: %w", dgst, err)
	}
	return &r, nil
}

func putRecord(tx *bolt.Tx, r *record) error {
	v, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("image: encode record of %s: %w", r.Digest, err)
	}
	return images(tx).Put([]byte(r.Digest), v)
}

// refsTo lists the references pointing at dgst, sorted.
func refsTo(tx *bolt.Tx, dgst string) []string {
	var out []string
	_ = refsB(tx).ForEach(func(k, v []byte) error {
		if string(v) == dgst {
			out = append(out, string(k))
		}
		return nil
	})
	sort.Strings(out)
	return out
}
