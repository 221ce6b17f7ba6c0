# make test: install what is missing, build the kernels, run the whole test suite. make lint: ruff.
# make demo: the same set-up, then the main job: train a small Deformable DETR on synthetic shapes on the CPU,
#            evaluate it, draw predictions and curves (outputs/demo_shapes). make benchmark: the op benchmark.
PYTHON ?= python3
export CUDA_HOME ?= /usr/local/cuda
# nvcc present: also compile the CUDA kernel, so that a CUDA compile error fails the build here too.
CUDA_FLAG := $(if $(wildcard $(CUDA_HOME)/bin/nvcc),--cuda,)
STAMP := .setup-done

.PHONY: setup kernels build test lint demo demo-shapes demo-dcn benchmark clean

setup: $(STAMP)

# Re-run pip only when requirements.txt changed or an import fails; pip itself is a no-op when satisfied.
$(STAMP): requirements.txt
	@$(PYTHON) -c "import torch, torchvision, scipy, pycocotools, timm, yaml, matplotlib, ninja, pytest, ruff, onnx, onnxscript, onnxruntime, transformers, safetensors" 2>/dev/null \
		&& $(PYTHON) -m pip install -q -r requirements.txt --disable-pip-version-check \
		|| $(PYTHON) -m pip install -r requirements.txt --disable-pip-version-check
	@touch $(STAMP)

# The kernels this machine runs: the CPU one, and the CUDA one where a GPU is visible.
kernels: setup
	$(PYTHON) -m ops.build

# For the tests: also the CUDA kernel wherever nvcc is (GPU or not), and the CUDA kernels for the host emulation,
# compiled side by side.
build: setup
	$(PYTHON) -m ops.build $(CUDA_FLAG) --emulated

test: build
	$(PYTHON) -m pytest -q tests

# ruff lint and format check, configured in pyproject.toml.
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo: demo-shapes

# The training demo: shapes data (made once), train on the CPU (evaluates at the end), evaluate the checkpoint,
# draw predictions on four validation images (one without shapes) and where the model looks on one, plot the curves. See README.md, "The demo".
SHAPES := data/shapes
# make demo DEMO_CONFIG=configs/demo_shapes_6min.yaml: the shorter recipe (same output folder).
DEMO_CONFIG ?= configs/demo_shapes.yaml
DEMO_OUT := outputs/demo_shapes
DEMO_IMAGES := $(foreach id,1 2 4 5,$(SHAPES)/val2017/00000000000$(id).png)

$(SHAPES)/annotations/instances_val2017.json:
	$(PYTHON) -m datasets.shapes --out $(SHAPES) --num-train 2000 --num-val 200 --seed 0 --size 128 --workers 2

# The kernel (one compiler) and the data (two processes) are made side by side.
demo-shapes: setup
	$(MAKE) --no-print-directory -j2 kernels $(SHAPES)/annotations/instances_val2017.json
	$(PYTHON) main.py train --config $(DEMO_CONFIG) --opts overwrite=true
	$(PYTHON) main.py eval --config $(DEMO_CONFIG) --opts resume=$(DEMO_OUT)/checkpoint.pth
	$(PYTHON) main.py predict --config $(DEMO_CONFIG) --opts resume=$(DEMO_OUT)/checkpoint.pth \
		--image $(DEMO_IMAGES) --out $(DEMO_OUT)/predictions --threshold 0.3
	$(PYTHON) main.py visualize --config $(DEMO_CONFIG) --opts resume=$(DEMO_OUT)/checkpoint.pth \
		--image $(word 2,$(DEMO_IMAGES)) --out $(DEMO_OUT)/visualize --threshold 0.3
	$(PYTHON) -m engine.plot_logs $(DEMO_OUT)

# The demo with a ResNet-18-DCNv2 backbone (configs/demo_shapes_dcn.yaml): train, then draw where its last three
# deformable convolutions sample (visualize/*_dcn_sampling.png).
demo-dcn: setup
	$(MAKE) --no-print-directory -j2 kernels $(SHAPES)/annotations/instances_val2017.json
	$(PYTHON) main.py train --config configs/demo_shapes_dcn.yaml --opts overwrite=true
	$(PYTHON) main.py visualize --config configs/demo_shapes_dcn.yaml --opts resume=$(DEMO_OUT)_dcn/checkpoint.pth \
		--image $(word 2,$(DEMO_IMAGES)) --out $(DEMO_OUT)_dcn/visualize --threshold 0.3

benchmark: kernels
	$(PYTHON) -m benchmarks.msda

clean:
	rm -f $(STAMP)
	rm -rf .pytest_cache
