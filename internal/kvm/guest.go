package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Guest-physical layout. Slot 0 is the snapshot's memory — the memory file
// maps onto it byte for byte and a userfaultfd serves it. Slot 1 is the
// invocation's I/O area, plain VMM memory: the page list in, the results
// out. ExitGPA is in no slot: the guest's store there is the MMIO exit that
// says it is done.
const (
	PageSize = 4096

	CodeGPA = 0x1000 // the toucher (toucherCode)
	PML4GPA = 0x2000 // page tables: PML4, PDPT, then 4 PDs identity-mapping
	PDPTGPA = 0x3000 // the first 4 GiB with 2 MiB pages, user-accessible
	PDGPA   = 0x4000 // PDs at 0x4000..0x7fff
	DataGPA = 2 << 20

	IOGPA   = 2 << 30
	ExitGPA = 3 << 30

	maxIOSize = 1 << 30
	// MaxDataPages bounds the data area: it must end below IOGPA.
	MaxDataPages = (IOGPA - DataGPA) / PageSize
	// MaxListPages bounds the page list of one run (copy mode puts a page
	// per entry in the 1 GiB I/O slot).
	MaxListPages = maxIOSize/(PageSize+8) - 1

	// doneValue is what the guest stores at ExitGPA when it is done.
	doneValue = 0x600d
	// hashPrime is the odd 64-bit multiplier of PageHash (FNV-1's prime).
	hashPrime = 0x100000001b3
)

// toucherCode is the guest program, 64-bit code run at CPL 3. Inputs in
// registers: rdi = GPA of the page list (one u64 GPA per page), rsi = its
// length, rdx = GPA of the output, rcx = mode (0 hash, 1 copy), r8 =
// ExitGPA. For each listed page it reads all 4096 bytes and either stores
// their PageHash (8 bytes per page) or copies them (4096 bytes per page) to
// the output, in list order; then it stores doneValue at ExitGPA forever.
// The hash runs four independent multiply chains so that the guest's own
// work stays small next to the memory it waits for. Source:
// testdata/toucher.s (TestToucherMatchesSource re-assembles it); the
// listing is objdump's.
var toucherCode = []byte{
	0x49, 0x89, 0xf9, //  0 start: mov r9,rdi
	0x49, 0x89, 0xf2, //  3 mov r10,rsi
	0x49, 0x89, 0xd3, //  6 mov r11,rdx
	0x49, 0x89, 0xcc, //  9 mov r12,rcx
	0x49, 0xbd, 0xb3, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, //  c movabs r13,0x100000001b3
	0x4d, 0x85, 0xd2, // 16 test r10,r10
	0x74, 0x78, // 19 je 93
	0x49, 0x8b, 0x31, // 1b next: mov rsi,[r9]
	0x49, 0x83, 0xc1, 0x08, // 1e add r9,0x8
	0x4d, 0x85, 0xe4, // 22 test r12,r12
	0x75, 0x59, // 25 jne 80
	0x48, 0x89, 0xf0, // 27 mov rax,rsi
	0x48, 0x8d, 0x5e, 0x01, // 2a lea rbx,[rsi+0x1]
	0x48, 0x8d, 0x56, 0x02, // 2e lea rdx,[rsi+0x2]
	0x48, 0x8d, 0x6e, 0x03, // 32 lea rbp,[rsi+0x3]
	0xb9, 0x80, 0x00, 0x00, 0x00, // 36 mov ecx,0x80
	0x48, 0x33, 0x06, // 3b hloop: xor rax,[rsi]
	0x49, 0x0f, 0xaf, 0xc5, // 3e imul rax,r13
	0x48, 0x33, 0x5e, 0x08, // 42 xor rbx,[rsi+0x8]
	0x49, 0x0f, 0xaf, 0xdd, // 46 imul rbx,r13
	0x48, 0x33, 0x56, 0x10, // 4a xor rdx,[rsi+0x10]
	0x49, 0x0f, 0xaf, 0xd5, // 4e imul rdx,r13
	0x48, 0x33, 0x6e, 0x18, // 52 xor rbp,[rsi+0x18]
	0x49, 0x0f, 0xaf, 0xed, // 56 imul rbp,r13
	0x48, 0x83, 0xc6, 0x20, // 5a add rsi,0x20
	0xff, 0xc9, // 5e dec ecx
	0x75, 0xd9, // 60 jne 3b
	0x49, 0x0f, 0xaf, 0xc5, // 62 imul rax,r13
	0x48, 0x31, 0xd8, // 66 xor rax,rbx
	0x49, 0x0f, 0xaf, 0xc5, // 69 imul rax,r13
	0x48, 0x31, 0xd0, // 6d xor rax,rdx
	0x49, 0x0f, 0xaf, 0xc5, // 70 imul rax,r13
	0x48, 0x31, 0xe8, // 74 xor rax,rbp
	0x49, 0x89, 0x03, // 77 mov [r11],rax
	0x49, 0x83, 0xc3, 0x08, // 7a add r11,0x8
	0xeb, 0x0e, // 7e jmp 8e
	0x4c, 0x89, 0xdf, // 80 copy: mov rdi,r11
	0xb9, 0x00, 0x02, 0x00, 0x00, // 83 mov ecx,0x200
	0xf3, 0x48, 0xa5, // 88 rep movs es:[rdi],ds:[rsi]
	0x49, 0x89, 0xfb, // 8b mov r11,rdi
	0x49, 0xff, 0xca, // 8e step: dec r10
	0x75, 0x88, // 91 jne 1b
	0xb8, 0x0d, 0x60, 0x00, 0x00, // 93 done: mov eax,0x600d
	0x41, 0x89, 0x00, // 98 mov [r8],eax
	0xeb, 0xf6, // 9b jmp 93
}

// PageHash is what the guest computes over one page at guest-physical
// address gpa: four lanes, lane k starting at gpa+k and taking the
// little-endian 64-bit words w with w mod 4 = k, each step
// h = (h XOR word) * 0x100000001b3; then h = ((h0*P XOR h1)*P XOR h2)*P
// XOR h3. Every step is a bijection of the lane (P is odd) and the final
// combination is one of each lane given the others, so a page that differs
// from the expected one in any single word always yields a different
// hash, and so does a right page at the wrong address.
func PageHash(gpa uint64, page []byte) uint64 {
	h := [4]uint64{gpa, gpa + 1, gpa + 2, gpa + 3}
	for i := 0; i+32 <= len(page); i += 32 {
		for k := range h {
			h[k] = (h[k] ^ binary.LittleEndian.Uint64(page[i+8*k:])) * hashPrime
		}
	}
	return ((h[0]*hashPrime^h[1])*hashPrime^h[2])*hashPrime ^ h[3]
}

// MemorySize is the size of slot 0 (and of the memory file) for a data area
// of dataPages pages.
func MemorySize(dataPages int) uint64 { return DataGPA + uint64(dataPages)*PageSize }

// DataPageGPA is the guest-physical address of data page p.
func DataPageGPA(p uint64) uint64 { return DataGPA + p*PageSize }

// fillPage writes data page p's contents for seed: a splitmix64 stream, so
// that every word of every page differs.
func fillPage(b []byte, seed, p uint64) {
	x := seed ^ (p+1)*0x9e3779b97f4a7c15
	for i := 0; i+8 <= len(b); i += 8 {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		binary.LittleEndian.PutUint64(b[i:], z^(z>>31))
	}
}

// WriteImage writes the memory file of a snapshot of the toucher guest
// with dataPages pages of data filled from seed: the code page, the page
// tables and the data area at their guest-physical addresses. The rest of
// the first 2 MiB is left as a hole (the manager serves holes as zero
// pages). An existing file at path is an error, never overwritten.
func WriteImage(path string, dataPages int, seed uint64) (retErr error) {
	if dataPages <= 0 || dataPages > MaxDataPages {
		return fmt.Errorf("write guest image %s: %d data pages, want 1..%d", path, dataPages, MaxDataPages)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("write guest image: %w", err)
	}
	defer func() {
		if cerr := f.Close(); retErr == nil && cerr != nil {
			retErr = fmt.Errorf("write guest image %s: %w", path, cerr)
		}
		if retErr != nil {
			os.Remove(path)
		}
	}()
	low := make([]byte, 0x8000)
	copy(low[CodeGPA:], toucherCode)
	const pte = 1 | 2 | 4 // present, writable, user
	le := binary.LittleEndian
	le.PutUint64(low[PML4GPA:], PDPTGPA|pte)
	for i := range uint64(4) {
		pd := PDGPA + i*PageSize
		le.PutUint64(low[PDPTGPA+i*8:], pd|pte)
		for j := range uint64(512) {
			le.PutUint64(low[pd+j*8:], (i<<30|j<<21)|pte|0x80) // 0x80: 2 MiB page
		}
	}
	if _, err := f.WriteAt(low[CodeGPA:], CodeGPA); err != nil {
		return fmt.Errorf("write guest image %s: %w", path, err)
	}
	const chunk = 256 // pages per write
	buf := make([]byte, chunk*PageSize)
	for p := 0; p < dataPages; p += chunk {
		n := min(chunk, dataPages-p)
		for i := range n {
			fillPage(buf[i*PageSize:(i+1)*PageSize], seed, uint64(p+i))
		}
		if _, err := f.WriteAt(buf[:n*PageSize], int64(DataPageGPA(uint64(p)))); err != nil {
			return fmt.Errorf("write guest image %s: %w", path, err)
		}
	}
	return nil
}

// Pattern is the order in which the guest touches data pages.
type Pattern string

const (
	// Sequential touches every data page in address order.
	Sequential Pattern = "sequential"
	// Random touches every data page once, in a random order.
	Random Pattern = "random"
	// Clustered touches runs of 1–64 contiguous pages separated by gaps of
	// 1–64 untouched pages (about half of the pages), the runs in a random
	// order, each run in address order.
	Clustered Pattern = "clustered"
)

// Patterns lists every Pattern.
var Patterns = []Pattern{Sequential, Random, Clustered}

// Pages returns the data pages (indices, not addresses) pattern touches in
// a data area of dataPages pages, in touch order; seed drives the random
// choices.
func (pat Pattern) Pages(dataPages int, seed uint64) ([]uint64, error) {
	if dataPages <= 0 || dataPages > MaxDataPages {
		return nil, fmt.Errorf("pattern %s: %d data pages, want 1..%d", pat, dataPages, MaxDataPages)
	}
	r := rand.New(rand.NewPCG(seed, uint64(dataPages)))
	n := uint64(dataPages)
	switch pat {
	case Sequential, Random:
		ps := make([]uint64, n)
		for i := range ps {
			ps[i] = uint64(i)
		}
		if pat == Random {
			r.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
		}
		return ps, nil
	case Clustered:
		var runs [][]uint64
		for p := r.Uint64N(64); p < n; {
			l := min(1+r.Uint64N(64), n-p)
			run := make([]uint64, l)
			for i := range run {
				run[i] = p + uint64(i)
			}
			runs = append(runs, run)
			p += l + 1 + r.Uint64N(64)
		}
		if len(runs) == 0 {
			runs = append(runs, []uint64{0})
		}
		r.Shuffle(len(runs), func(i, j int) { runs[i], runs[j] = runs[j], runs[i] })
		return slices.Concat(runs...), nil
	}
	return nil, fmt.Errorf("unknown page pattern %q (want sequential, random or clustered)", pat)
}

// OutputMode says what the guest leaves for the host to verify.
type OutputMode uint64

const (
	// OutputHash: the PageHash of each page read, 8 bytes per page.
	OutputHash OutputMode = 0
	// OutputCopy: a copy of every byte read, 4096 bytes per page.
	OutputCopy OutputMode = 1
)

func (m OutputMode) bytesPerPage() uint64 {
	if m == OutputCopy {
		return PageSize
	}
	return 8
}

// Guest is a VM ready to run the toucher over one page list: slot 0 (the
// snapshot memory, Memory) is an anonymous private mapping that stays
// untouched until the guest runs, so the caller decides how its pages
// arrive: registered with a userfaultfd and served by a memory manager in
// another process, or copied in by the caller.
type Guest struct {
	sys   *System
	vm    *VM
	vcpu  *VCPU
	mem   []byte // slot 0
	io    []byte // slot 1
	pages []uint64
	mode  OutputMode
	ran   bool
}

// GuestConfig describes a Guest.
type GuestConfig struct {
	// DataPages is the size of the data area, in pages.
	DataPages int
	// Pages lists the data pages to touch, in order.
	Pages []uint64
	// Output selects what the guest leaves for Verify.
	Output OutputMode
	// Image, if set, is mapped privately (MAP_PRIVATE) as slot 0: the
	// kernel pages it in from the page cache on the guest's first access,
	// as a VMM restoring from a mapped memory file does. Otherwise slot 0
	// is anonymous memory for the caller to fill or have served.
	Image *os.File
}

func (c GuestConfig) validate() error {
	if c.DataPages <= 0 || c.DataPages > MaxDataPages {
		return fmt.Errorf("%d data pages, want 1..%d", c.DataPages, MaxDataPages)
	}
	if len(c.Pages) > MaxListPages {
		return fmt.Errorf("%d pages to touch, at most %d", len(c.Pages), MaxListPages)
	}
	if c.Output != OutputHash && c.Output != OutputCopy {
		return fmt.Errorf("unknown output mode %d", c.Output)
	}
	for _, p := range c.Pages {
		if p >= uint64(c.DataPages) {
			return fmt.Errorf("page %d outside the data area of %d pages", p, c.DataPages)
		}
	}
	if c.Image != nil {
		fi, err := c.Image.Stat()
		if err != nil {
			return fmt.Errorf("guest image: %w", err)
		}
		if uint64(fi.Size()) != MemorySize(c.DataPages) {
			return fmt.Errorf("guest image %s is %d bytes, want %d for %d data pages", c.Image.Name(), fi.Size(), MemorySize(c.DataPages), c.DataPages)
		}
	}
	return nil
}

// NewGuest creates the VM and loads the page list. Unless cfg.Image is
// set it maps slot 0 but never touches it; the I/O slot is populated now so
// that a run pays only for slot 0's pages.
func NewGuest(cfg GuestConfig) (_ *Guest, retErr error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("new guest: %w", err)
	}
	dataPages, pages, mode := cfg.DataPages, cfg.Pages, cfg.Output
	g := &Guest{pages: slices.Clone(pages), mode: mode}
	defer func() {
		if retErr != nil {
			g.Close()
		}
	}()
	var err error
	if g.sys, err = Open(); err != nil {
		return nil, err
	}
	if g.vm, err = g.sys.NewVM(); err != nil {
		return nil, err
	}
	if cfg.Image != nil {
		g.mem, err = unix.Mmap(int(cfg.Image.Fd()), 0, int(MemorySize(dataPages)), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	} else {
		g.mem, err = unix.Mmap(-1, 0, int(MemorySize(dataPages)), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	}
	if err != nil {
		return nil, fmt.Errorf("new guest: map guest memory: %w", err)
	}
	ioSize := g.listSize() + roundUp(uint64(len(pages))*mode.bytesPerPage())
	g.io, err = unix.Mmap(-1, 0, int(ioSize), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("new guest: map I/O area: %w", err)
	}
	for i, p := range pages {
		binary.LittleEndian.PutUint64(g.io[i*8:], DataPageGPA(p))
	}
	if err := g.vm.SetMemory(0, 0, g.mem); err != nil {
		return nil, fmt.Errorf("new guest: %w", err)
	}
	if err := g.vm.SetMemory(1, IOGPA, g.io); err != nil {
		return nil, fmt.Errorf("new guest: %w", err)
	}
	if g.vcpu, err = g.vm.NewVCPU(); err != nil {
		return nil, err
	}
	regs := Regs{
		RIP: CodeGPA, RDI: IOGPA, RSI: uint64(len(pages)), RDX: IOGPA + g.listSize(),
		RCX: uint64(mode), R8: ExitGPA,
	}
	if err := g.vcpu.EnterUserMode64(PML4GPA, regs); err != nil {
		return nil, fmt.Errorf("new guest: %w", err)
	}
	return g, nil
}

func roundUp(n uint64) uint64 { return (n + PageSize - 1) &^ (PageSize - 1) }

func (g *Guest) listSize() uint64 { return roundUp(uint64(len(g.pages)) * 8) }

// Memory is slot 0: guest-physical [0, MemorySize) as host memory, the
// range a userfaultfd registers (Firecracker's guest memory region).
func (g *Guest) Memory() []byte { return g.mem }

// RunStats is what one run measured.
type RunStats struct {
	Elapsed time.Duration // KVM_RUN entry to the done exit
	Exits   int           // VM exits seen by the VMM (the done exit included)
	// From KVM's vCPU statistics, when the kernel has them (else -1):
	// KVMExits counts every exit to the hypervisor, PageFaults the guest
	// page faults KVM took (pf_taken: under shadow paging every first touch
	// of a page that has no shadow entry yet, whether or not the host page
	// is present; KVM then maps up to 8 present neighbours at once).
	KVMExits   int64
	PageFaults int64
}

// Run runs the guest until it reports done. It returns an error if the
// guest stops any other way (a triple fault, an unexpected exit) or the
// run was already done. A fault on a slot-0 page that nobody serves blocks
// Run inside KVM_RUN.
func (g *Guest) Run() (RunStats, error) {
	if g.ran {
		return RunStats{}, errors.New("guest run: already ran")
	}
	g.ran = true
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	st := RunStats{KVMExits: -1, PageFaults: -1}
	before, statsErr := g.vcpu.Stats()
	t0 := time.Now()
	for {
		e, err := g.vcpu.Run()
		if err != nil {
			return st, fmt.Errorf("guest run: %w", err)
		}
		st.Exits++
		if e.Reason == ExitMMIO && e.MMIOWrite && e.MMIOAddr == ExitGPA && e.MMIOValue() == doneValue {
			st.Elapsed = time.Since(t0)
			if after, err := g.vcpu.Stats(); err == nil && statsErr == nil {
				st.KVMExits = int64(after["exits"] - before["exits"])
				st.PageFaults = int64(after["pf_taken"] - before["pf_taken"])
			}
			return st, nil
		}
		r, _ := g.vcpu.Regs()
		return st, fmt.Errorf("guest run: unexpected exit after %d exits: %v (rip %#x)", st.Exits, e, r.RIP)
	}
}

// Verification is the result of checking the guest's output.
type Verification struct {
	Pages      int    // pages checked
	Bytes      int64  // bytes of guest reads they cover
	Mismatches int    // pages whose output differs from the file
	First      string // the first mismatch, described
}

// Verify checks the guest's output after Run against image, the memory file
// the guest's slot 0 should hold: in copy mode every byte of every page the
// guest read, in hash mode the PageHash of each.
func (g *Guest) Verify(image io.ReaderAt) (Verification, error) {
	var v Verification
	if !g.ran {
		return v, errors.New("verify guest output: guest has not run")
	}
	want := make([]byte, PageSize)
	out := g.io[g.listSize():]
	for i, p := range g.pages {
		gpa := DataPageGPA(p)
		if n, err := image.ReadAt(want, int64(gpa)); n != PageSize {
			return v, fmt.Errorf("verify guest output: read page %d of the image: %d bytes: %w", p, n, err)
		}
		v.Pages++
		v.Bytes += PageSize
		switch g.mode {
		case OutputCopy:
			got := out[uint64(i)*PageSize : uint64(i+1)*PageSize]
			if j := firstDiff(got, want); j >= 0 {
				v.Mismatches++
				if v.First == "" {
					v.First = fmt.Sprintf("entry %d, data page %d (GPA %#x) byte %d: guest read %#x, image has %#x", i, p, gpa, j, got[j], want[j])
				}
			}
		case OutputHash:
			got := binary.LittleEndian.Uint64(out[i*8:])
			if w := PageHash(gpa, want); got != w {
				v.Mismatches++
				if v.First == "" {
					v.First = fmt.Sprintf("entry %d, data page %d (GPA %#x): guest hash %#x, image hash %#x", i, p, gpa, got, w)
				}
			}
		}
	}
	return v, nil
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// Close releases the VM and its memory.
func (g *Guest) Close() error {
	var errs []error
	if g.vcpu != nil {
		errs = append(errs, g.vcpu.Close())
	}
	if g.vm != nil {
		errs = append(errs, g.vm.Close())
	}
	if g.sys != nil {
		errs = append(errs, g.sys.Close())
	}
	for _, m := range [][]byte{g.mem, g.io} {
		if m != nil {
			errs = append(errs, unix.Munmap(m))
		}
	}
	g.vcpu, g.vm, g.sys, g.mem, g.io = nil, nil, nil, nil, nil
	return errors.Join(errs...)
}
