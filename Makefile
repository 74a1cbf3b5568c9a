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
        clang_format:clang-format wheel:wheel matplotlib:matplotlib
NATIVE_SOURCES := $(shell find csrc python -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)
NATIVE_BUILD := build/native

.PHONY: all install build demo test test-python test-native lint clean

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

test: lint build test-native test-python

# Formatting is automatic (ruff format, clang-format); CI fails when a file is not formatted.
lint: .make-deps
	$(VENV)/bin/ruff check r2m_ext tests benchmarks setup.py
	$(VENV)/bin/ruff format --check r2m_ext tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(filter %.cpp %.h %.cu,$(NATIVE_SOURCES))

test-python: build
	R2M_REQUIRE_NATIVE=1 $(VPY) -m pytest -q tests

# Python-free core: C++ tests, and an nvcc compile of every .cu file when nvcc is on this machine.
test-native:
	cmake -S . -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(shell command -v nvcc),-DR2M_REQUIRE_CUDA=ON,) >/dev/null
	cmake --build $(NATIVE_BUILD) -j 2
	cd $(NATIVE_BUILD) && ctest --output-on-failure

clean:
	rm -rf build $(VENV) .make-deps .make-build r2m_ext/_C*.so *.egg-info
