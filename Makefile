# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv/ when it is missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the releases on this project's machines (never newer than 2.14.1).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-full test lint venv data clean bench gpu-check

$(STAMP): pyproject.toml data_pipelines/_jpeg_region.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,eval,export,openvino,test,s3]'
	touch $(STAMP)

venv: $(STAMP)

data/default/train/index.json: $(STAMP) data_pipelines/synthetic.py
	$(BIN)/python -m vitssl.data_pipelines.synthetic --out data/default

data: data/default/train/index.json

demo: $(STAMP) data
	$(BIN)/python -m vitssl.train.demo

# the whole chain on the embedded data: pretrain -> evaluate -> distil -> INT8 + ONNX artefact;
# exits 3 when the student's artefact fails its verdict (README: "make demo-full")
demo-full: $(STAMP) data
	$(BIN)/python -m vitssl.train.edge_export pipeline export_pipeline_demo

test: $(STAMP)
	$(BIN)/ruff check train models data_pipelines slurm tests vitssl/__init__.py
	$(BIN)/ruff format --check train models data_pipelines slurm tests vitssl/__init__.py
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check --fix train models data_pipelines slurm tests vitssl/__init__.py
	$(BIN)/ruff format train models data_pipelines slurm tests vitssl/__init__.py

bench: $(STAMP)
	$(BIN)/python -m vitssl.train.benchmark

# on one H100/H200, <= 8 minutes: throughput, MFU, nvJPEG data path, ZeRO-3 offload, GPU tests
gpu-check: $(STAMP)
	$(BIN)/python -m vitssl.train.gpu_check --out reports/gpu_check.md

clean:
	rm -rf runs data
