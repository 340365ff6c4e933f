package store

import (
	"testing"
	"time"
)

func TestFunctionsSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := FunctionRecord{Name: "hello", Image: "localhost/vhive/helloworld:latest", Sandbox: "gvisor",
		Port: 50051, Env: map[string]string{"A": "b"}, Keepalive: time.Minute, Concurrency: 1, Created: time.Unix(10, 0).UTC()}
	if err := s.PutFunction(rec); err != nil {
		t.Fatal(err)
	}
	if err := s.PutInstance(InstanceRecord{ID: "i1", Function: "hello"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fns, err := s.Functions()
	if err != nil {
		t.Fatal(err)
	}
	if len(fns) != 1 || fns[0].Name != "hello" || fns[0].Env["A"] != "b" || fns[0].Keepalive != time.Minute || !fns[0].Created.Equal(rec.Created) {
		t.Fatalf("functions after reopen = %+v", fns)
	}
	inst, err := s.Instances()
	if err != nil || len(inst) != 1 || inst[0].ID != "i1" {
		t.Fatalf("instances after reopen = %+v, %v", inst, err)
	}
	if err := s.DeleteFunction("hello"); err != nil {
		t.Fatal(err)
	}
	if fns, _ := s.Functions(); len(fns) != 0 {
		t.Fatalf("function still listed after delete: %+v", fns)
	}
}

func TestOpenTwiceFailsClearly(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := Open(dir); err == nil {
		t.Fatal("second Open of a locked database succeeded")
	}
}
