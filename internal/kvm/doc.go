// Package kvm is a minimal KVM harness: a VM with one vCPU running a tiny
// hand-assembled 64-bit guest at CPL 3 that reads a chosen list of pages
// and leaves, for each, a copy of its bytes or a hash of them for the host
// to verify. Its guest memory is an anonymous private mapping that the
// caller can register with a userfaultfd and hand to the memory manager
// (package memory) through Firecracker's handshake, so that a real vCPU's
// faults — KVM's own accesses to guest memory — are what the manager
// serves. The tests and BenchmarkGuestRestore do exactly that, with the VMM
// in a re-executed child process and the manager in the test process.
//
// # Why ring 3
//
// This machine kind's /dev/kvm is PVM (kvm_pvm: shadow paging, no VT-x or
// SVM). PVM runs guest ring 3 natively and emulates guest ring 0
// instruction by instruction, and unmodified Linux kernels die in that
// emulator. So the guest is entered directly in 64-bit mode at CPL 3
// (VCPU.EnterUserMode64) and never runs ring-0 code: no IDT, no interrupts,
// and any exception ends it with a triple fault (ExitShutdown), which Run
// reports. See RATIONALE.md.
//
// # Guest-physical layout
//
//	slot 0 (the snapshot: the memory file maps onto it byte for byte)
//	  0x1000        the toucher's code (toucherCode)
//	  0x2000        PML4
//	  0x3000        PDPT
//	  0x4000-0x7fff 4 PDs: the first 4 GiB identity-mapped with 2 MiB
//	                user-accessible pages
//	  2 MiB         the data area, DataPages pages (WriteImage fills each
//	                with a distinct pseudo-random stream)
//	slot 1 at 2 GiB (VMM memory, never served): the page list (one u64 GPA
//	                per page), then the output (8 bytes or 4096 bytes per page)
//	3 GiB           no memory: the guest's store of 0x600d here is the MMIO
//	                exit that says it is done
//
// A run therefore faults, besides its data pages, on six slot-0 pages: the
// code, the PML4, the PDPT and the PDs of the data, the I/O slot and the
// exit address.
//
// # Gating
//
// Available says whether a VM with a vCPU can be created, and why not;
// tests skip with that reason (VHIVE_REQUIRE_KVM=1 makes it a failure).
package kvm
