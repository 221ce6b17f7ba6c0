# make test: install what is missing, build the kernels, run the whole test suite.
# make demo: the same set-up, then the main job (for now the op benchmark).
PYTHON ?= python3
export CUDA_HOME ?= /usr/local/cuda
# nvcc present: also compile the CUDA kernel, so that a CUDA compile error fails the build here too.
CUDA_FLAG := $(if $(wildcard $(CUDA_HOME)/bin/nvcc),--cuda,)
STAMP := .setup-done

.PHONY: setup build test demo benchmark clean

setup: $(STAMP)

# Re-run pip only when requirements.txt changed or an import fails; pip itself is a no-op when satisfied.
$(STAMP): requirements.txt
	@$(PYTHON) -c "import torch, torchvision, scipy, pycocotools, timm, yaml, matplotlib, ninja, pytest" 2>/dev/null \
		&& $(PYTHON) -m pip install -q -r requirements.txt --disable-pip-version-check \
		|| $(PYTHON) -m pip install -r requirements.txt --disable-pip-version-check
	@touch $(STAMP)

build: setup
	$(PYTHON) -m ops.build $(CUDA_FLAG)

test: build
	$(PYTHON) -m pytest -q tests

demo: build
	$(PYTHON) -m ops.benchmark

benchmark: build
	$(PYTHON) -m ops.benchmark

clean:
	rm -f $(STAMP)
	rm -rf .pytest_cache
