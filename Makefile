# gpu-dra build, test and demo entry points.
CARGO ?= cargo
export GOTOOLCHAIN := local

.PHONY: all build test bench chaos demo fake-nvml rig clean tools deploy-manifests image image-check debs

all: build

build:
	$(CARGO) build --workspace

rig:
	$(MAKE) -C tests/cluster

test: rig tools debs image-check
	$(CARGO) build --workspace
	$(CARGO) test --workspace

# Warm-plugin latency benchmarks (benches/: prepare, dynamic_mig, shares; see
# benches/README.md for their knobs); need the fake NVML's cdylib and tools.
bench:
	$(CARGO) build -p fake-nvml
	$(CARGO) bench --bench prepare --bench dynamic_mig --bench shares

# Kill campaign at 1,000 kill points (tests/e2e_chaos.rs); prints the seed and the counts
# (kill points, pods, violations). GPU_DRA_CHAOS_SEED picks another seed.
chaos: rig
	$(CARGO) build --workspace
	GPU_DRA_CHAOS_KILLS=$${GPU_DRA_CHAOS_KILLS:-1000} $(CARGO) test --test e2e_chaos -- --nocapture

clean:
	$(CARGO) clean

demo: rig
	$(CARGO) build --workspace
	$(CARGO) run --example demo

# Helm and the image assembler (tools/go.mod pins their versions).
tools:
	$(MAKE) -C tools

# deploy/*.yaml rendered from the chart (tests/deploy_chart.rs fails when they drift).
deploy-manifests: tools
	deploy/render-manifests.sh deploy

# OCI image archive of the release binary, no container engine (tests/image.rs runs it).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE ?= ghcr.io/gpu-dra/gpu-dra:$(VERSION)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
IMAGE_ARCHIVE := $(TARGET_DIR)/image/gpu-dra-$(VERSION).oci.tar

image: tools debs
	$(CARGO) build --release --bin gpu-dra
	deploy/image/build.sh $(TARGET_DIR)/release/gpu-dra $(VERSION) $(IMAGE) $(IMAGE_ARCHIVE)

# The same recipe over the debug binary, for tests/image.rs in `make test`: the image's
# contents, entrypoint, user and labels are checked without a release build in CI.
IMAGE_CHECK_ARCHIVE := $(TARGET_DIR)/image/gpu-dra-$(VERSION)-check.oci.tar

image-check: tools debs
	$(CARGO) build --bin gpu-dra
	deploy/image/build.sh $(TARGET_DIR)/debug/gpu-dra $(VERSION) $(IMAGE) $(IMAGE_CHECK_ARCHIVE)

# Debian packages the tests and the image need: a real systemd (tests/mps_cgroup_kill.rs,
# systemd-run in the image) and util-linux (setsid, unshare, nsenter). Installed when missing.
DEBS := systemd util-linux
debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; fi
