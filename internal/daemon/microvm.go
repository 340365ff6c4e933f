package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/sandbox/microvm"
)

// Accelerator choices of --microvm-accel.
const (
	AccelAuto = "auto"
	AccelKVM  = microvm.AccelKVM
	AccelTCG  = microvm.AccelTCG
)

// setupMicroVM creates the microvm backend from the guest assets `make
// microvm` put in the cache (QEMU, the kernel, the initramfs with the agent).
func (d *Daemon) setupMicroVM(ctx context.Context) error {
	m, err := assets.Load(assets.Dir(cacheDir()))
	if err != nil {
		return fmt.Errorf("%w (run `make microvm`)", err)
	}
	accel, why := chooseAccel(d.cfg.MicroVMAccel, hostAccelFacts())
	if accel == "" {
		return fmt.Errorf("--microvm-accel %s: %s", d.cfg.MicroVMAccel, why)
	}
	d.log.Info("microvm accelerator", "accel", accel, "why", why)
	be, err := microvm.New(ctx, microvm.Config{Root: filepath.Join(d.cfg.StateDir, "sandboxes", "microvm"), Assets: m,
		NetPool: d.net, Accel: accel, Logger: d.log.With("component", "microvm")})
	if err != nil {
		return err
	}
	if err := be.Cleanup(ctx); err != nil {
		return fmt.Errorf("clean up microvm sandboxes of a previous run: %w", err)
	}
	d.backends[microvm.Name] = be
	d.runtimeVersions[microvm.Name] = be.RuntimeVersion()
	d.closers = append(d.closers, be.Cleanup)
	return nil
}

// accelFacts are what decides whether QEMU can run a Linux guest under KVM.
type accelFacts struct {
	kvmErr   error // opening /dev/kvm
	vmx, svm bool  // hardware virtualisation in /proc/cpuinfo
	pvm      bool  // the kvm_pvm module is loaded (no VT-x/SVM; stock kernels die in it)
}

func hostAccelFacts() accelFacts {
	var f accelFacts
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		f.kvmErr = err
	} else {
		unix.Close(fd)
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
				for _, fl := range strings.Fields(v) {
					f.vmx = f.vmx || fl == "vmx"
					f.svm = f.svm || fl == "svm"
				}
				break
			}
		}
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		f.pvm = true
	}
	return f
}

// chooseAccel resolves --microvm-accel: auto picks kvm only where /dev/kvm
// opens and the CPU has VT-x or SVM and the KVM is not PVM (PVM runs no stock
// Linux kernel: RATIONALE.md); else tcg. An explicit kvm that cannot work
// returns "" and the reason.
func chooseAccel(want string, f accelFacts) (accel, why string) {
	kvmOK, reason := true, "/dev/kvm opens and the CPU has hardware virtualisation"
	switch {
	case f.kvmErr != nil:
		kvmOK, reason = false, fmt.Sprintf("/dev/kvm: %v", f.kvmErr)
	case f.pvm:
		kvmOK, reason = false, "/dev/kvm is PVM (kvm_pvm loaded), on which stock Linux guests do not boot"
	case !f.vmx && !f.svm:
		kvmOK, reason = false, "the CPU flags show neither vmx nor svm"
	}
	switch want {
	case "", AccelAuto:
		if kvmOK {
			return AccelKVM, "auto: " + reason
		}
		return AccelTCG, "auto: software emulation, since " + reason
	case AccelKVM:
		if !kvmOK {
			return "", reason
		}
		return AccelKVM, "asked for: " + reason
	case AccelTCG:
		return AccelTCG, "asked for"
	}
	return "", fmt.Sprintf("unknown accelerator %q (auto, kvm, tcg)", want)
}
