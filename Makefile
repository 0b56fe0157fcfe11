# gpu-dra build, test and demo entry points.
CARGO ?= cargo
export GOTOOLCHAIN := local

.PHONY: all build test bench chaos demo fake-nvml rig clean

all: build

build:
	$(CARGO) build --workspace

rig:
	$(MAKE) -C tests/cluster

test: rig
	$(CARGO) build --workspace
	$(CARGO) test --workspace

# Warm-plugin latency benchmark (benches/prepare.rs); needs the fake NVML's cdylib and tools.
bench:
	$(CARGO) build -p fake-nvml
	$(CARGO) bench --bench prepare

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
