package uffd

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

// TestCopyZeroPageWake installs pages into a registered mapping of this
// process. The test never touches a page before it is installed, so it
// never faults on its own userfaultfd.
func TestCopyZeroPageWake(t *testing.T) {
	testutil.RequiresRoot(t)
	ps := os.Getpagesize()
	u, err := New(FeatureEventRemove)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	mem, err := unix.Mmap(-1, 0, 4*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := uintptr(unsafe.Pointer(&mem[0]))
	if err := u.Register(base, uintptr(len(mem))); err != nil {
		t.Fatal(err)
	}
	src := bytes.Repeat([]byte{0xAB}, 2*ps)
	n, err := u.Copy(base, uintptr(unsafe.Pointer(&src[0])), uint64(2*ps), ModeDontWake)
	if err != nil || n != uint64(2*ps) {
		t.Fatalf("Copy = %d, %v; want %d, nil", n, err, 2*ps)
	}
	if err := u.Wake(base, uint64(2*ps)); err != nil {
		t.Fatal(err)
	}
	// Copying over a present page fails with EEXIST and installs nothing.
	n, err = u.Copy(base+uintptr(ps), uintptr(unsafe.Pointer(&src[0])), uint64(ps), 0)
	if !errors.Is(err, unix.EEXIST) || n != 0 {
		t.Fatalf("Copy over a present page = %d, %v; want 0, EEXIST", n, err)
	}
	// Pages 2 and 3 become zero pages.
	n, err = u.ZeroPage(base+uintptr(2*ps), uint64(2*ps), 0)
	if err != nil || n != uint64(2*ps) {
		t.Fatalf("ZeroPage = %d, %v", n, err)
	}
	if !bytes.Equal(mem[:2*ps], src) {
		t.Fatal("copied pages do not hold the source bytes")
	}
	if !bytes.Equal(mem[2*ps:], make([]byte, 2*ps)) {
		t.Fatal("zero pages are not zero")
	}
	// Nothing is pending: Read returns 0 without blocking.
	var msgs [4]Msg
	if n, err := u.Read(msgs[:]); n != 0 || err != nil {
		t.Fatalf("Read = %d, %v; want 0, nil", n, err)
	}
	// Wrap accepts only userfaultfds.
	if _, err := Wrap(int(os.Stdin.Fd())); err == nil {
		t.Fatal("Wrap(stdin) succeeded")
	}
	if _, err := Wrap(u.Int()); err != nil {
		t.Fatalf("Wrap(userfaultfd): %v", err)
	}
}

func TestDecodeMsg(t *testing.T) {
	b := make([]byte, MsgSize)
	b[0] = EventPagefault
	b[8] = byte(PagefaultWrite)
	b[16], b[17] = 0x00, 0x10 // address 0x1000
	if m := DecodeMsg(b); m.Event != EventPagefault || m.Flags != PagefaultWrite || m.Address != 0x1000 {
		t.Fatalf("pagefault: %+v", m)
	}
	b = make([]byte, MsgSize)
	b[0] = EventRemove
	b[9] = 0x20  // start 0x2000
	b[17] = 0x40 // end 0x4000
	if m := DecodeMsg(b); m.Event != EventRemove || m.Start != 0x2000 || m.End != 0x4000 {
		t.Fatalf("remove: %+v", m)
	}
}
