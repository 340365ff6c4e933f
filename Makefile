# vhive — build, demo and test on a fresh Debian 12 machine (run as root).
#
#   make demo   installs what is missing, builds runsc, vhive and the example
#               images, then runs a daemon, deploys helloworld and invokes it
#               cold then warm (gVisor and runc)
#   make test   installs what is missing, then runs every test suite (CI)

SHELL        := /bin/bash
export PATH  := /usr/local/go/bin:$(PATH)
GO           ?= go
VHIVE_CACHE  ?= /var/cache/vhive
export VHIVE_CACHE
RUNSC_VERSION := v0.0.0-20260905035102-160fafc42237
RUNSC        := $(VHIVE_CACHE)/bin/runsc
RUNSC_STAMP  := $(VHIVE_CACHE)/bin/.runsc-$(RUNSC_VERSION)
BIN          := bin/vhive
IMAGES       := out/images
APT_PKGS     := runc iproute2 ca-certificates containerd containernetworking-plugins busybox-static openssl mmdebstrap iptables nftables \
                qemu-system-x86 e2fsprogs xz-utils
FUZZTIME     ?= 60s

.PHONY: all build deps runsc microvm images images-go images-python images-full demo test test-unit test-fuzz fuzz vet proto clean bench \
	cri-tools k8s-tools critest k8s-e2e bench-cri bench-smoke reliability \
	cluster-tools cluster cluster-down cluster-e2e knative-tools

all: build

## deps: install the Debian packages vhive needs (idempotent)
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq $$missing; \
	fi

## runsc: build runsc from the pinned gVisor module (tools/runsc), cached
runsc: $(RUNSC_STAMP)
$(RUNSC_STAMP): tools/runsc/go.mod tools/runsc/go.sum
	@mkdir -p $(VHIVE_CACHE)/bin
	@echo "building runsc $(RUNSC_VERSION) (a few minutes the first time)"
	cd tools/runsc && CGO_ENABLED=0 $(GO) build -trimpath \
		-ldflags "-X gvisor.dev/gvisor/runsc/version.version=$(RUNSC_VERSION)" \
		-o $(RUNSC).tmp gvisor.dev/gvisor/runsc
	mv $(RUNSC).tmp $(RUNSC)
	touch $@

## microvm: the microvm sandbox's guest assets in $(VHIVE_CACHE)/microvm —
## QEMU (apt), Debian's cloud kernel (unpacked from its package, never
## installed), an initramfs with vhive's guest agent (docs/microvm.md)
microvm: deps
	$(GO) run ./tools/microvm -cache $(VHIVE_CACHE)

## build: the vhive binary
build:
	$(GO) build -o $(BIN) ./cmd/vhive

## images: package the example functions as OCI images (Go: Linux and wasm;
## Python: the CI set of functions/python, from Debian packages)
images: images-go images-python

images-go:
	$(GO) run ./tools/mkimage -all -target both -out $(IMAGES)

## images-python: the CI set of the Python suite (docs/functions.md), built
## with mmdebstrap; bases cached under $(VHIVE_CACHE)/debimage
images-python: deps
	$(GO) run ./tools/mkimage -python ci -out $(IMAGES)

## images-full: every Python function, including those too large for CI
## (PyTorch, OpenCV)
images-full: deps images-go
	$(GO) run ./tools/mkimage -python full -out $(IMAGES)

## demo: the main job — see the README
demo: deps runsc microvm build images-go
	./scripts/demo.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./internal/bench/ ./internal/kdeploy/

## test: every suite, with the real tools (what CI runs): Go tests (real
## runsc, runc, netns, userfaultfd, containerd, loopback registry; they include
## every fuzz target's seeds and saved findings, see test-fuzz), critest
## against containerd and vhive, and the kubelet end-to-end test
test: deps runsc microvm cri-tools k8s-tools cluster-tools vet test-unit bench-smoke critest k8s-e2e cluster-e2e

test-unit:
	CI=$${CI:-true} VHIVE_RUNSC=$(RUNSC) $(GO) test -count=1 -timeout 40m ./... 2>&1 | tee /tmp/vhive-test.log; exit $${PIPESTATUS[0]}

## bench-smoke: `vhive bench`, `vhive invoker` and `vhive deployer` end to end
## against a real daemon (1 iteration, helloworld, every mode of every sandbox)
bench-smoke: runsc
	CI=$${CI:-true} VHIVE_RUNSC=$(RUNSC) $(GO) test -tags e2e -count=1 -timeout 30m -run TestBenchSmoke ./internal/bench/

# Every fuzz target as <package dir>:<FuzzName>.
FUZZ_TARGETS = $(shell grep -r --include='*_test.go' -o '^func Fuzz[A-Za-z0-9_]*' internal functions 2>/dev/null | sed 's|/[^/]*:func |:|' | sort)
FUZZ_PKGS    = $(sort $(foreach t,$(FUZZ_TARGETS),./$(firstword $(subst :, ,$(t)))))
FUZZ_NAMES   = $(sort $(foreach t,$(FUZZ_TARGETS),$(lastword $(subst :, ,$(t)))))
FUZZ_EMPTY   :=
FUZZ_SPACE   := $(FUZZ_EMPTY) $(FUZZ_EMPTY)

## test-fuzz: every fuzz target's seeds and saved findings
## (testdata/fuzz/<FuzzName>/) as regression tests, no new inputs, so the
## result is deterministic. test-unit runs them too (go test runs each fuzz
## target's corpus), so make test does not run this again.
test-fuzz: runsc
	CI=$${CI:-true} VHIVE_RUNSC=$(RUNSC) $(GO) test -count=1 -timeout 20m -run '^($(subst $(FUZZ_SPACE),|,$(FUZZ_NAMES)))$$' $(FUZZ_PKGS)

## fuzz: exploratory fuzzing of every fuzz target for FUZZTIME (60s) each,
## with fresh random inputs; run by make reliability, not by make test (a new
## finding must not block unrelated changes). A failing input is written to
## the package's testdata/fuzz/<FuzzName>/: docs/reliability.md says how to
## keep it with its fix. Every target runs even after a failure.
fuzz: runsc
	@failed=""; for t in $(FUZZ_TARGETS); do \
		pkg=./$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
		CI=$${CI:-true} VHIVE_RUNSC=$(RUNSC) $(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) $$pkg || failed="$$failed $$pkg:$$name"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzzing found failures in:$$failed"; exit 1; fi

## reliability: the full reliability and security suite (docs/reliability.md):
## the tests under internal/reliability with VHIVE_RELIABILITY=full (more crash
## trials, longer fuzzing and load), then make fuzz (exploratory fuzzing of
## every fuzz target). Its fast subset runs in make test as part of test-unit
## (the same tests with the default VHIVE_RELIABILITY=fast).
reliability: deps runsc
	CI=$${CI:-true} VHIVE_RELIABILITY=full VHIVE_RUNSC=$(RUNSC) $(GO) test -count=1 -timeout 40m -v ./internal/reliability/... 2>&1 | tee /tmp/vhive-reliability.log; rc=$${PIPESTATUS[0]}; \
	$(MAKE) --no-print-directory fuzz || rc=1; exit $$rc

## cri-tools: crictl and critest (cri-tools v1.37.0), cached
cri-tools:
	bash scripts/critest/build.sh

## k8s-tools: kubelet, kube-apiserver, scheduler, controller-manager, kubectl,
## kube-proxy (k8s.io/kubernetes v1.37.2) and embedded etcd, cached (~15 min cold)
k8s-tools:
	bash scripts/k8s/build.sh

## knative-tools: Knative Serving v0.50.0 (controller, activator, autoscaler,
## webhook, queue), Traefik v3.6.12 and CoreDNS v1.15.0 from their Go modules
## (tools/knative), cached with a manifest (docs/knative.md; 20-60 min cold)
knative-tools:
	$(GO) run ./tools/mkknative -cache $(VHIVE_CACHE)

## critest: critest against stock containerd and vhive's CRI in one run;
## fails if vhive fails a spec containerd passes (docs/critest.md)
critest: deps cri-tools
	bash scripts/critest/run.sh

## k8s-e2e: a real kubelet on vhive's CRI: Knative-shaped pod, RuntimeClass
## deployment, teardown (docs/cri.md)
k8s-e2e: deps runsc cri-tools k8s-tools
	bash scripts/k8s/e2e.sh

## cluster-tools: the image registry the cluster's nodes pull from
cluster-tools:
	@mkdir -p $(VHIVE_CACHE)/bin
	$(GO) build -o $(VHIVE_CACHE)/bin/vhive-critest-registry ./scripts/critest/registry

## cluster: a Kubernetes cluster of NODES workers (default 3) on this machine,
## each a netns with its own containerd, vhive daemon (its CRI), kubelet and
## kube-proxy; prints the kubeconfig path and leaves it running; a second run
## reuses it (docs/cluster.md)
NODES ?= 3
cluster: deps runsc k8s-tools cluster-tools build
	$(BIN) cluster up --nodes $(NODES)

## cluster-down: stop the cluster and remove everything it made
cluster-down: build
	$(BIN) cluster down

## cluster-e2e: a 2-worker cluster of its own (instance 1): two functions
## deployed from deploy/functions.json, the invoker through their Services
## (0 errors), pods on both nodes, scale from zero, loss of a worker with the
## failover errors counted, restart and cleanup (docs/cluster-functions.md).
## VHIVE_E2E_NODES/RPS/TIME/REPORT change the run (docs/benchmarks.md)
cluster-e2e: deps runsc k8s-tools cluster-tools
	CI=$${CI:-true} VHIVE_RUNSC=$(RUNSC) $(GO) test -tags e2e -count=1 -timeout 25m -v -run TestClusterE2E ./internal/kdeploy/ 2>&1 | tee /tmp/vhive-cluster-e2e.log; exit $${PIPESTATUS[0]}

bench-cri:
	$(GO) test -count=3 -run '^$$' -bench ContainerRun -benchtime 20x ./internal/cri/

## bench-kvm: a real vCPU (ring-3 guest on /dev/kvm) restored lazily, recorded,
## prefetched (REAP) and from the raw floor, 16/64/256 MiB (docs/benchmarks/kvm.md)
.PHONY: bench-kvm
bench-kvm:
	VHIVE_REQUIRE_KVM=1 $(GO) test -run '^$$' -bench 'GuestRestore/size=64MiB' -benchtime 3x -count 3 ./internal/kvm/
	VHIVE_REQUIRE_KVM=1 $(GO) test -run '^$$' -bench 'GuestRestore/size=(16|256)MiB' -benchtime 1x -count 3 ./internal/kvm/

## bench: the go benchmarks (see docs/benchmarks.md)
bench: runsc
	VHIVE_RUNSC=$(RUNSC) $(GO) test -run '^$$' -bench . -benchtime 10x ./internal/... ./functions/...

## proto: regenerate the protobuf code (needs protoc, protoc-gen-go, protoc-gen-go-grpc)
proto:
	protoc -I api/proto --go_out=. --go_opt=module=vhive.dev/vhive --go-grpc_out=. --go-grpc_opt=module=vhive.dev/vhive \
		api/proto/helloworld/helloworld.proto api/proto/vhive/control.proto
	protoc -I functions/echo-grpc --go_out=. --go_opt=module=vhive.dev/vhive --go-grpc_out=. --go-grpc_opt=module=vhive.dev/vhive \
		functions/echo-grpc/echopb/echo.proto

clean:
	rm -rf bin out
