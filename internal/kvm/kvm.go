package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers of include/uapi/linux/kvm.h (x86-64): _IO/_IOR/_IOW/_IOWR
// of type 0xAE with the sizes of the structs below. golang.org/x/sys/unix
// has none of them.
const (
	ioctlGetAPIVersion       = 0xAE00     // _IO(KVMIO, 0x00)
	ioctlCreateVM            = 0xAE01     // _IO(KVMIO, 0x01)
	ioctlGetVCPUMmapSize     = 0xAE04     // _IO(KVMIO, 0x04)
	ioctlGetSupportedCPUID   = 0xC008AE05 // _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
	ioctlCreateVCPU          = 0xAE41     // _IO(KVMIO, 0x41)
	ioctlSetUserMemoryRegion = 0x4020AE46 // _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
	ioctlRun                 = 0xAE80     // _IO(KVMIO, 0x80)
	ioctlGetRegs             = 0x8090AE81 // _IOR(KVMIO, 0x81, struct kvm_regs)
	ioctlSetRegs             = 0x4090AE82 // _IOW(KVMIO, 0x82, struct kvm_regs)
	ioctlGetSregs            = 0x8138AE83 // _IOR(KVMIO, 0x83, struct kvm_sregs)
	ioctlSetSregs            = 0x4138AE84 // _IOW(KVMIO, 0x84, struct kvm_sregs)
	ioctlSetCPUID2           = 0x4008AE90 // _IOW(KVMIO, 0x90, struct kvm_cpuid2)

	apiVersion = 12 // KVM_API_VERSION, stable since Linux 2.6.22
)

// Exit reasons (KVM_EXIT_*) in kvm_run.exit_reason.
const (
	ExitIO            = 2
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitInternalError = 17
)

// Regs is struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// segment is struct kvm_segment.
type segment struct {
	Base                                 uint64
	Limit                                uint32
	Selector                             uint16
	Type, Present, DPL, DB, S, L, G, AVL uint8
	Unusable, _                          uint8
}

// dtable is struct kvm_dtable.
type dtable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// sregs is struct kvm_sregs.
type sregs struct {
	CS, DS, ES, FS, GS, SS, TR, LDT segment
	GDT, IDT                        dtable
	CR0, CR2, CR3, CR4, CR8, EFER   uint64
	APICBase                        uint64
	InterruptBitmap                 [4]uint64
}

// memoryRegion is struct kvm_userspace_memory_region.
type memoryRegion struct {
	Slot, Flags   uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// cpuidEntry is struct kvm_cpuid_entry2.
type cpuidEntry struct {
	Function, Index, Flags uint32
	EAX, EBX, ECX, EDX     uint32
	_                      [3]uint32
}

// maxCPUIDEntries bounds KVM_GET_SUPPORTED_CPUID (KVM allows 256).
const maxCPUIDEntries = 256

// cpuid2 is struct kvm_cpuid2 with room for maxCPUIDEntries entries.
type cpuid2 struct {
	NEnt    uint32
	_       uint32
	Entries [maxCPUIDEntries]cpuidEntry
}

// Compile-time checks that the structs have the kernel's sizes (the ioctl
// numbers encode them).
var (
	_ [144 - unsafe.Sizeof(Regs{})]byte
	_ [unsafe.Sizeof(Regs{}) - 144]byte
	_ [312 - unsafe.Sizeof(sregs{})]byte
	_ [unsafe.Sizeof(sregs{}) - 312]byte
	_ [32 - unsafe.Sizeof(memoryRegion{})]byte
	_ [unsafe.Sizeof(memoryRegion{}) - 32]byte
	_ [40 - unsafe.Sizeof(cpuidEntry{})]byte
	_ [unsafe.Sizeof(cpuidEntry{}) - 40]byte
)

func ioctl(fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return int(r), errno
	}
	return int(r), nil
}

// ErrUnavailable classifies every reason KVM cannot be used here (no
// /dev/kvm, no permission, wrong API version, VM creation refused).
var ErrUnavailable = errors.New("KVM unavailable")

// System is an open /dev/kvm.
type System struct {
	fd int
}

// Open opens /dev/kvm and checks its API version. The error wraps
// ErrUnavailable and names the reason.
func Open() (*System, error) {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open /dev/kvm (uid %d): %w", ErrUnavailable, os.Geteuid(), err)
	}
	v, err := ioctl(fd, ioctlGetAPIVersion, nil)
	if err != nil || v != apiVersion {
		unix.Close(fd)
		return nil, fmt.Errorf("%w: /dev/kvm API version %d (want %d): %v", ErrUnavailable, v, apiVersion, err)
	}
	return &System{fd: fd}, nil
}

// Close closes /dev/kvm; VMs created from it stay valid.
func (s *System) Close() error { return unix.Close(s.fd) }

// Flavour says which KVM implementation serves /dev/kvm: "pvm" when the
// kvm_pvm module is loaded (shadow paging, no VT-x/SVM), "intel" or "amd"
// for hardware virtualisation, "" if unknown.
func Flavour() string {
	for _, m := range []string{"kvm_pvm", "kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			return m[len("kvm_"):]
		}
	}
	return ""
}

// Available reports whether a VM with a vCPU can be created here; the
// error wraps ErrUnavailable and says why not.
func Available() error {
	s, err := Open()
	if err != nil {
		return err
	}
	defer s.Close()
	vm, err := s.NewVM()
	if err != nil {
		return err
	}
	defer vm.Close()
	c, err := vm.NewVCPU()
	if err != nil {
		return err
	}
	return c.Close()
}

// VM is one virtual machine.
type VM struct {
	sys    *System
	fd     int
	cpuid  *cpuid2
	mmapSz int
}

// NewVM creates a VM with no memory and no vCPU.
func (s *System) NewVM() (*VM, error) {
	fd, err := ioctl(s.fd, ioctlCreateVM, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: KVM_CREATE_VM: %w", ErrUnavailable, err)
	}
	sz, err := ioctl(s.fd, ioctlGetVCPUMmapSize, nil)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	cpuid := &cpuid2{NEnt: maxCPUIDEntries}
	if _, err := ioctl(s.fd, ioctlGetSupportedCPUID, unsafe.Pointer(cpuid)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
	}
	return &VM{sys: s, fd: fd, cpuid: cpuid, mmapSz: sz}, nil
}

// Close closes the VM's descriptor; the kernel frees the VM once its vCPUs
// are closed too.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// SetMemory makes mem (page-aligned memory from mmap, never the Go heap)
// guest-physical memory [gpa, gpa+len(mem)) in the given slot. KVM does not
// touch the pages: the first guest access faults them in through the host
// mapping, so a userfaultfd registered over mem serves them.
func (vm *VM) SetMemory(slot uint32, gpa uint64, mem []byte) error {
	if len(mem) == 0 || gpa%4096 != 0 || len(mem)%4096 != 0 {
		return fmt.Errorf("KVM memory slot %d at %#x: %d bytes, want a non-empty multiple of 4096 at an aligned address", slot, gpa, len(mem))
	}
	r := memoryRegion{Slot: slot, GuestPhysAddr: gpa, MemorySize: uint64(len(mem)), UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vm.fd, ioctlSetUserMemoryRegion, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d [%#x, +%#x): %w", slot, gpa, len(mem), err)
	}
	return nil
}

// VCPU is one virtual CPU and its shared kvm_run page.
type VCPU struct {
	fd  int
	run []byte
}

// NewVCPU creates vCPU 0 with the host's supported CPUID (long mode needs
// CPUID.80000001h:EDX.LM in the guest's CPUID on hardware KVM).
func (vm *VM) NewVCPU() (_ *VCPU, retErr error) {
	fd, err := ioctl(vm.fd, ioctlCreateVCPU, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: KVM_CREATE_VCPU: %w", ErrUnavailable, err)
	}
	defer func() {
		if retErr != nil {
			unix.Close(fd)
		}
	}()
	if _, err := ioctl(fd, ioctlSetCPUID2, unsafe.Pointer(vm.cpuid)); err != nil {
		return nil, fmt.Errorf("KVM_SET_CPUID2: %w", err)
	}
	run, err := unix.Mmap(fd, 0, vm.mmapSz, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map kvm_run: %w", err)
	}
	return &VCPU{fd: fd, run: run}, nil
}

// Close unmaps kvm_run and closes the vCPU.
func (c *VCPU) Close() error {
	unix.Munmap(c.run)
	return unix.Close(c.fd)
}

// Regs returns the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	if _, err := ioctl(c.fd, ioctlGetRegs, unsafe.Pointer(&r)); err != nil {
		return r, fmt.Errorf("KVM_GET_REGS: %w", err)
	}
	return r, nil
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	if _, err := ioctl(c.fd, ioctlSetRegs, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	return nil
}

// Control-register and EFER bits for EnterUserMode64.
const (
	cr0PE   = 1 << 0
	cr0MP   = 1 << 1
	cr0ET   = 1 << 4
	cr0NE   = 1 << 5
	cr0WP   = 1 << 16
	cr0AM   = 1 << 18
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

// EnterUserMode64 puts the vCPU straight into 64-bit mode at CPL 3 with
// paging on, page tables at cr3, and r's registers (RFLAGS bit 1 forced).
// No code ever runs in ring 0: under PVM guest ring 0 is emulated
// instruction by instruction, ring 3 runs natively. There is no IDT, so
// any exception ends the guest with a triple fault (ExitShutdown).
func (c *VCPU) EnterUserMode64(cr3 uint64, r Regs) error {
	var s sregs
	if _, err := ioctl(c.fd, ioctlGetSregs, unsafe.Pointer(&s)); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	code := segment{Limit: 0xffffffff, Selector: 0x18 | 3, Type: 11, Present: 1, DPL: 3, S: 1, L: 1, G: 1}
	data := segment{Limit: 0xffffffff, Selector: 0x20 | 3, Type: 3, Present: 1, DPL: 3, DB: 1, S: 1, G: 1}
	s.CS, s.DS, s.ES, s.FS, s.GS, s.SS = code, data, data, data, data, data
	// A usable busy 64-bit TSS and an unusable LDT: VMX entry checks
	// demand them; PVM ignores them.
	s.TR = segment{Limit: 0x67, Selector: 0x28, Type: 11, Present: 1}
	s.LDT = segment{Unusable: 1}
	s.CR3 = cr3
	s.CR4 = cr4PAE
	s.EFER = eferLME | eferLMA
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0AM | cr0PG
	if _, err := ioctl(c.fd, ioctlSetSregs, unsafe.Pointer(&s)); err != nil {
		return fmt.Errorf("KVM_SET_SREGS (64-bit, CPL 3): %w", err)
	}
	r.RFLAGS |= 2
	return c.SetRegs(r)
}

// Exit is why KVM_RUN returned.
type Exit struct {
	Reason uint32
	// MMIO (Reason == ExitMMIO): the guest-physical address, whether it
	// was a write, and the bytes written (Len of Data).
	MMIOAddr  uint64
	MMIOWrite bool
	MMIOLen   uint32
	MMIOData  [8]byte
	// IO (Reason == ExitIO): port and direction (1 = out).
	IOPort uint16
	IODir  uint8
	// Suberror (ExitInternalError) or hardware reason (ExitFailEntry).
	Detail uint64
}

// MMIOValue returns the little-endian value the guest wrote.
func (e Exit) MMIOValue() uint64 {
	var b [8]byte
	copy(b[:], e.MMIOData[:min(e.MMIOLen, 8)])
	return binary.LittleEndian.Uint64(b[:])
}

func (e Exit) String() string {
	switch e.Reason {
	case ExitMMIO:
		return fmt.Sprintf("MMIO write=%v addr=%#x len=%d value=%#x", e.MMIOWrite, e.MMIOAddr, e.MMIOLen, e.MMIOValue())
	case ExitIO:
		return fmt.Sprintf("IO port=%#x dir=%d", e.IOPort, e.IODir)
	case ExitHLT:
		return "HLT"
	case ExitShutdown:
		return "shutdown (triple fault: an exception in a guest without an IDT)"
	case ExitFailEntry:
		return fmt.Sprintf("entry failed (hardware reason %#x)", e.Detail)
	case ExitInternalError:
		return fmt.Sprintf("internal error (suberror %d)", e.Detail)
	}
	return fmt.Sprintf("exit reason %d", e.Reason)
}

// Run enters the guest until its next exit. EINTR (a signal arrived, e.g.
// Go's preemption) re-enters. Call it from one locked OS thread.
func (c *VCPU) Run() (Exit, error) {
	for {
		_, err := ioctl(c.fd, ioctlRun, nil)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return Exit{}, fmt.Errorf("KVM_RUN: %w", err)
		}
		break
	}
	le := binary.LittleEndian
	e := Exit{Reason: le.Uint32(c.run[8:])}
	switch e.Reason {
	case ExitMMIO:
		e.MMIOAddr = le.Uint64(c.run[32:])
		copy(e.MMIOData[:], c.run[40:48])
		e.MMIOLen = le.Uint32(c.run[48:])
		e.MMIOWrite = c.run[52] != 0
	case ExitIO:
		e.IODir = c.run[32]
		e.IOPort = le.Uint16(c.run[34:])
	case ExitInternalError:
		e.Detail = uint64(le.Uint32(c.run[32:]))
	case ExitFailEntry:
		e.Detail = le.Uint64(c.run[32:])
	}
	return e, nil
}

const ioctlGetStatsFD = 0xAECE // _IO(KVMIO, 0xce), Linux 5.14+

// Stats returns the vCPU's counters from KVM's binary statistics
// (KVM_GET_STATS_FD): exits, pf_taken, pf_fixed, pf_guest, ... — the
// cumulative ones, by name. Histograms and peaks are left out.
func (c *VCPU) Stats() (map[string]uint64, error) {
	fd, err := ioctl(c.fd, ioctlGetStatsFD, nil)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_STATS_FD: %w", err)
	}
	f := os.NewFile(uintptr(fd), "kvm-vcpu-stats")
	defer f.Close()
	var hdr [24]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return nil, fmt.Errorf("read KVM stats header: %w", err)
	}
	le := binary.LittleEndian
	nameSize, n := le.Uint32(hdr[4:]), le.Uint32(hdr[8:])
	descOff, dataOff := int64(le.Uint32(hdr[16:])), int64(le.Uint32(hdr[20:]))
	descSize := int64(16 + nameSize)
	if n > 4096 || nameSize > 4096 {
		return nil, fmt.Errorf("KVM stats header: %d descriptors with %d-byte names", n, nameSize)
	}
	descs := make([]byte, int64(n)*descSize)
	if _, err := f.ReadAt(descs, descOff); err != nil {
		return nil, fmt.Errorf("read KVM stats descriptors: %w", err)
	}
	const (
		typeMask       = 0xf
		typeCumulative = 0
		unitMask       = 0xf0
		unitNone       = 0
	)
	out := map[string]uint64{}
	var v [8]byte
	for i := range int64(n) {
		d := descs[i*descSize : (i+1)*descSize]
		flags, size, off := le.Uint32(d), le.Uint16(d[6:]), le.Uint32(d[8:])
		if flags&typeMask != typeCumulative || flags&unitMask != unitNone || size != 1 {
			continue
		}
		name := string(d[16:])
		if j := strings.IndexByte(name, 0); j >= 0 {
			name = name[:j]
		}
		if _, err := f.ReadAt(v[:], dataOff+int64(off)); err != nil {
			return nil, fmt.Errorf("read KVM stat %s: %w", name, err)
		}
		out[name] = le.Uint64(v[:])
	}
	return out, nil
}
