// Package store keeps the daemon's durable state in an embedded bbolt
// database, so a restarted daemon still knows every deployed function and
// can clean up the instances its previous run left behind.
//
// Schema (one bbolt file, <state-dir>/vhive.db):
//
//	meta/       "schema" → "1"
//	functions/  <name>   → JSON FunctionRecord
//	instances/  <id>     → JSON InstanceRecord   (live instances; removed on stop)
//
// Values are JSON so that the records stay readable with bbolt's CLI and new
// optional fields need no migration.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

const schemaVersion = "1"

var (
	bucketMeta      = []byte("meta")
	bucketFunctions = []byte("functions")
	bucketInstances = []byte("instances")
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("not found")

// FunctionRecord is a deployed function as persisted.
type FunctionRecord struct {
	Name        string            `json:"name"`
	Image       string            `json:"image"`
	ImageDigest string            `json:"image_digest"`
	Sandbox     string            `json:"sandbox"`
	Port        int               `json:"port"`
	Env         map[string]string `json:"env,omitempty"`
	Keepalive   time.Duration     `json:"keepalive"`
	MaxInst     int               `json:"max_instances"`
	Concurrency int               `json:"concurrency"`
	StartMode   string            `json:"start_mode"`
	MemoryMiB   int64             `json:"memory_mib,omitempty"`
	CPU         float64           `json:"cpu,omitempty"`
	Created     time.Time         `json:"created"`
	// Protocol is "grpc" or "http"; records written before it existed
	// have none and are gRPC functions.
	Protocol      string `json:"protocol,omitempty"`
	ReadinessPath string `json:"readiness_path,omitempty"`
}

// InstanceRecord is a running instance as persisted, so that a daemon that
// crashed can report what it cleaned up.
type InstanceRecord struct {
	ID       string    `json:"id"`
	Function string    `json:"function"`
	Sandbox  string    `json:"sandbox"`
	Started  time.Time `json:"started"`
}

// Store is the daemon's state database.
type Store struct {
	db *bolt.DB
}

// Open opens (creating if needed) the database in dir.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %q: %w", dir, err)
	}
	path := filepath.Join(dir, "vhive.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open state database %q (is another vhive daemon using this --state-dir?): %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketFunctions, bucketInstances} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get([]byte("schema")); v != nil && string(v) != schemaVersion {
			return fmt.Errorf("state database schema %q, this vhive understands %q", v, schemaVersion)
		}
		return meta.Put([]byte("schema"), []byte(schemaVersion))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialise state database %q: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

func put(db *bolt.DB, bucket []byte, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).Put([]byte(key), data)
	})
}

func del(db *bolt.DB, bucket []byte, key string) error {
	return db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).Delete([]byte(key))
	})
}

func list[T any](db *bolt.DB, bucket []byte) ([]T, error) {
	var out []T
	err := db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).ForEach(func(k, v []byte) error {
			var rec T
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode record %q in %s: %w", k, bucket, err)
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

// PutFunction stores or replaces a function record.
func (s *Store) PutFunction(rec FunctionRecord) error {
	if err := put(s.db, bucketFunctions, rec.Name, rec); err != nil {
		return fmt.Errorf("store function %q: %w", rec.Name, err)
	}
	return nil
}

// DeleteFunction removes a function record.
func (s *Store) DeleteFunction(name string) error {
	if err := del(s.db, bucketFunctions, name); err != nil {
		return fmt.Errorf("delete function %q: %w", name, err)
	}
	return nil
}

// Functions lists every function record, sorted by name.
func (s *Store) Functions() ([]FunctionRecord, error) {
	return list[FunctionRecord](s.db, bucketFunctions)
}

// PutInstance records a live instance.
func (s *Store) PutInstance(rec InstanceRecord) error {
	if err := put(s.db, bucketInstances, rec.ID, rec); err != nil {
		return fmt.Errorf("store instance %q: %w", rec.ID, err)
	}
	return nil
}

// DeleteInstance forgets an instance.
func (s *Store) DeleteInstance(id string) error {
	if err := del(s.db, bucketInstances, id); err != nil {
		return fmt.Errorf("delete instance %q: %w", id, err)
	}
	return nil
}

// Instances lists every recorded instance.
func (s *Store) Instances() ([]InstanceRecord, error) {
	return list[InstanceRecord](s.db, bucketInstances)
}
