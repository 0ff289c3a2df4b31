# The README's commands. PYTHON may be overridden (make test PYTHON=python3.12); default python,
# else python3 (GPU images often have only python3).
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)
SHELL := /bin/bash
GPU_CHECK_OUT ?= gpu-check-out
NVCC ?= nvcc
# The emulator's schedule for emu-test: each warp runs as far as the barriers allow before the
# next, with asynchronous cp.async (tools/cuda_emu/cuda_emu.h lists the others); grids sized
# for an H100's 132 SMs, as the GPU will see them.
EMU_ORDER ?= warps
EMU_SMS ?= 132

.PHONY: build-deps install test bench cuda-check cuda-build-check triton-check emu-test gpu-check info clean

install:            ## build the extension in place (CPU kernels; CUDA kernels when torch has CUDA)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

# What a fresh venv with only torch lacks: the build's setuptools >= 64 and wheel (the bundled
# setuptools 65 needs wheel for an editable install), then each target's extra.
build-deps:
	$(PYTHON) -m pip install --disable-pip-version-check "setuptools>=64" wheel

# One build each: the editable install with the target's extra (torch, already there, is kept).
test: build-deps    ## builds with the [test] extra, then the test suite (CPU; `gpu` tests run too when CUDA is present)
	$(PYTHON) -m pip install --disable-pip-version-check --no-build-isolation -e ".[test]"
	$(PYTHON) -m pytest -q

bench: build-deps   ## builds with the [bench] extra (matplotlib: the PNG), then benchmarks -> bench-results/; BENCH_ARGS="--quick ..."
	$(PYTHON) -m pip install --disable-pip-version-check --no-build-isolation -e ".[bench]"
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

cuda-check:         ## compile-check every CUDA kernel with nvcc (sm_80, sm_90a): regs / smem / spills; skips without nvcc
	@$(PYTHON) tools/cuda_check.py --nvcc "$(NVCC)"

triton-check:       ## build every Triton kernel family and autotune config for sm_90 / sm_80 offline: wgmma / mma, cp.async, >= 3 stages, no spills
	@$(PYTHON) tools/triton_check.py --all-configs $(TRITON_CHECK_ARGS)

cuda-build-check:   ## the real CUDA build (setup.py, a CUDA torch in a private venv), loaded: every op has CPU + CUDA kernels; no GPU needed
	@PYTHON=$(PYTHON) NVCC="$(NVCC)" tools/cuda_build_check.sh

emu-test: install    ## tests/test_op_dtypes.py (kernel set cuda_emu) on the host SIMT emulator of the CUDA kernels (no GPU); EMU_ORDER=warps
	@if $(PYTHON) tools/cuda_emu/build.py --check-toolkit; then \
		PYTHON=$(PYTHON) ASPP_CUDA_EMU_ORDER=$(EMU_ORDER) ASPP_CUDA_EMU_SMS=$(EMU_SMS) tools/cuda_emu/run_tests.sh; \
	else echo "emu-test: skipped (the emulator build needs the CUDA toolkit's headers)"; fi

gpu-check:          ## on a GPU machine: one ~540 s call in stages -> GPU_CHECK_OUT (<= 8 files); see tools/gpu_check.sh
	PYTHON=$(PYTHON) tools/gpu_check.sh $(GPU_CHECK_OUT)

info:
	$(PYTHON) -m aspp_fused.info

clean:
	rm -rf build *.egg-info aspp_fused/_C*.so $(GPU_CHECK_OUT) bench-results

.PHONY: fuzz
fuzz: install       ## tests/test_fuzz.py at full count (500 random cases per op per backend, CUDA kernels' on a GPU); FUZZ_ARGS="-k triton"
	$(PYTHON) -m pytest -q --run-slow tests/test_fuzz.py $(FUZZ_ARGS)
