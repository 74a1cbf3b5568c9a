# The two commands a fresh machine needs: `make demo` and `make test` (README.md).
#
# .venv is created with --system-site-packages so a machine that already has torch (the GPU image:
# torch + CUDA, no internet) uses it; only modules that do not import are installed, torch pinned.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
# module:pip-requirement pairs; a module that imports is left alone.
DEPS := torch:$(TORCH_PIN) numpy:numpy safetensors:safetensors yaml:pyyaml tqdm:tqdm \
        pytest:pytest pytest_benchmark:pytest-benchmark ninja:ninja ruff:ruff \
        clang_format:clang-format wheel:wheel matplotlib:matplotlib PIL:pillow \
        peft:peft==0.21.2 mergekit:mergekit==0.1.5 fusion_bench:fusion-bench==0.2.33
NATIVE_SOURCES := $(shell find csrc python -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
NATIVE_BUILD := build/native

.PHONY: all install build demo test test-python test-native test-cuda-build lint clean

all: build

install: .make-deps

.make-deps: Makefile
	@test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@missing=""; for dep in $(DEPS); do \
	  $(VPY) -c "import $${dep%%:*}" >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(VPY) -m pip install -q $$missing; fi
	@touch $@

# The extension is rebuilt when a native source or setup.py changes.
build: .make-build

.make-build: .make-deps setup.py $(NATIVE_SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

demo: build
	$(VPY) -m r2m_ext.demo

test: lint build test-native test-python test-cuda-build

# Formatting is automatic (ruff format, clang-format); CI fails when a file is not formatted.
lint: .make-deps
	$(VENV)/bin/ruff check r2m_ext tests benchmarks setup.py
	$(VENV)/bin/ruff format --check r2m_ext tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(filter %.cpp %.h %.cu %.cuh,$(NATIVE_SOURCES))

test-python: build
	R2M_REQUIRE_NATIVE=1 $(VPY) -m pytest -q tests

# Python-free core: C++ tests, and an nvcc compile of every .cu file when nvcc is on this machine.
test-native:
	cmake -S . -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(shell command -v nvcc),-DR2M_REQUIRE_CUDA=ON,) >/dev/null
	cmake --build $(NATIVE_BUILD) -j 2
	cd $(NATIVE_BUILD) && ctest --output-on-failure

# The whole extension built with CUDA against the registry's CUDA 13.0 torch, in its own venv and
# build directory (the CPU build is never touched): every CUDA source compiled and linked, the
# result imported, and the op tests run with it. Wherever nvcc is installed, GPU or not; nvcc here
# is a wrapper script, so CUDA_HOME is given rather than guessed from its location.
CUDA_VENV := .venv-cuda
CUDA_TORCH_PIN := torch==2.12.0
CUDA_BUILD := build/cuda
CUDA_HOME ?= /usr/local/cuda

test-cuda-build: .make-deps
	@if ! command -v nvcc >/dev/null; then echo "nvcc not found: no CUDA build"; exit 0; fi; \
	set -e; \
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(CUDA_VENV); \
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
	  $(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH_PIN) safetensors tqdm ninja wheel; \
	include=$$($(CUDA_VENV)/bin/python -c \
	  "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))"); \
	CPATH=$$include CUDA_HOME=$(CUDA_HOME) R2M_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext \
	  --build-lib $(CUDA_BUILD)/lib --build-temp $(CUDA_BUILD)/temp; \
	rm -rf $(CUDA_BUILD)/pkg; mkdir -p $(CUDA_BUILD)/pkg; cp -r r2m_ext $(CUDA_BUILD)/pkg/; \
	cp $(CUDA_BUILD)/lib/r2m_ext/_C*.so $(CUDA_BUILD)/pkg/r2m_ext/; \
	cd $(CUDA_BUILD)/pkg; \
	$(CURDIR)/$(CUDA_VENV)/bin/python -c \
	  "import r2m_ext._C as c; assert c.with_cuda; print('CUDA build imports, torch', c.torch_version)"; \
	R2M_REQUIRE_NATIVE=1 $(CURDIR)/$(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  $(CURDIR)/tests/test_ops.py $(CURDIR)/tests/test_svd.py $(CURDIR)/tests/test_cuda.py

clean:
	rm -rf build $(VENV) $(CUDA_VENV) .make-deps .make-build r2m_ext/_C*.so *.egg-info
