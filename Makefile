# The README's commands. PYTHON may be overridden (make test PYTHON=python3.12).
PYTHON ?= python
GPU_CHECK_OUT ?= gpu-check-out
NVCC ?= nvcc

.PHONY: install test test-fast bench cuda-check gpu-check info clean

install:            ## build the extension in place (CPU kernels; CUDA kernels when torch has CUDA)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test: install       ## the test suite (CPU; `gpu` tests run too when CUDA is present)
	$(PYTHON) -m pytest -q

bench: install      ## throughput benchmarks -> benchmarks/results/<date>_<device>.{json,md,png}; BENCH_ARGS="--quick ..."
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

cuda-check:         ## compile-check every CUDA kernel with nvcc (sm_80, sm_90a)
	@if ls csrc/cuda/*.cu csrc/cuda/*.cuh >/dev/null 2>&1; then \
		echo "cuda-check: CUDA sources present but no checker wired yet" ; exit 1; \
	else echo "cuda-check: no CUDA kernels in csrc/cuda yet; nothing to compile"; fi

gpu-check: install  ## on a GPU machine: gpu tests, logs to $(GPU_CHECK_OUT)/
	mkdir -p $(GPU_CHECK_OUT)
	$(PYTHON) -m aspp_fused.info | tee $(GPU_CHECK_OUT)/info.txt
	$(PYTHON) -m pytest -q -m gpu 2>&1 | tee $(GPU_CHECK_OUT)/pytest-gpu.log

info:
	$(PYTHON) -m aspp_fused.info

clean:
	rm -rf build *.egg-info aspp_fused/_C*.so $(GPU_CHECK_OUT)
