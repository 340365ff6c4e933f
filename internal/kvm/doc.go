// Package kvm is a minimal KVM harness: a VM with one vCPU running a tiny
// hand-assembled 64-bit guest at CPL 3 that reads a chosen list of pages
// and leaves, for each, either a copy of its bytes or a hash of them for
// the host to verify. Its guest memory is an anonymous private mapping the
// caller can register with a userfaultfd and hand to the memory manager
// through Firecracker's handshake, so that a real vCPU's faults (KVM's own
// accesses to guest memory) are what the manager serves.
package kvm
