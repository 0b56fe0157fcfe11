# gpu-dra build, test and demo entry points.
CARGO ?= cargo
export GOTOOLCHAIN := local

.PHONY: all build test bench demo fake-nvml rig clean

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

clean:
	$(CARGO) clean

demo: rig
	$(CARGO) build --workspace
	$(CARGO) run --example demo
