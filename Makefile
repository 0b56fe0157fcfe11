# gpu-dra build, test and demo entry points.
CARGO ?= cargo
export GOTOOLCHAIN := local

.PHONY: all build test bench demo fake-nvml rig clean

all: build

build:
	$(CARGO) build --workspace --bins

test:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

bench:
	$(CARGO) bench

clean:
	$(CARGO) clean
