# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if missing, install, make the demo DICOM, run the federation
#                 (make demo TASK=segmentation or TASK=segmentation-3d: U-Nets on DICOM SEG masks;
#                 TASK=four-class: four kinds of case)
#   make test   - the same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# make demo TASK=segmentation: the 2D U-Net on DICOM SEG masks, with its own data and preset;
# TASK=segmentation-3d: the 3D U-Net on patches of the same series; TASK=four-class: a classifier
# of four kinds of case (configs/four-class.toml).
TASK ?= classification
ifeq ($(filter classification four-class segmentation segmentation-3d,$(TASK)),)
$(error TASK=$(TASK): use classification, four-class, segmentation or segmentation-3d)
endif
DEMO_MARKER := site-2/labels.csv
DEMO_TASK := classification
DEMO_FLAGS :=
ifneq ($(filter segmentation segmentation-3d,$(TASK)),)
DEMO_DATA := outputs/demo-seg
DEMO_CONFIG := configs/$(TASK).toml
DEMO_MARKER := site-2/series-000/SEG.dcm
DEMO_TASK := segmentation
else ifeq ($(TASK),four-class)
DEMO_DATA := outputs/demo-4class
DEMO_CONFIG := configs/four-class.toml
DEMO_FLAGS := --classes 4
else
DEMO_DATA := outputs/demo-data
DEMO_CONFIG := configs/demo.toml
endif
# Flower's connections and local SuperLink state stay inside the project, never in $HOME.
export FLWR_HOME := $(CURDIR)/outputs/flwr-home

.PHONY: setup demo demo-data deploy-local test test-fast bench bench-quick bench-gpu clean

setup: $(VENV)/.installed

# torch first: a bare torch requirement would pull a multi-GB CUDA build; the project's range
# accepts the CPU build installed here.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo-data: setup
	@test -f $(DEMO_DATA)/$(DEMO_MARKER) -a -f $(DEMO_DATA)/site-2/site.toml -a -f $(DEMO_DATA)/.fedcare-demo-sites \
		|| $(BIN)/fedcare demo-data --out $(DEMO_DATA) --sites 3 --task $(DEMO_TASK) $(DEMO_FLAGS) --overwrite

demo: demo-data
	$(BIN)/fedcare run --config $(DEMO_CONFIG) --sites 3 --fresh-sites

# A real TLS, key-authenticated federation of 2 sites on loopback, through the image's entry point;
# its demo data, credentials, state and logs all stay under outputs/deploy-local.
deploy-local: setup
	$(BIN)/fedcare deploy local --sites 2 --rounds 2 --out outputs/deploy-local

# Two workers: an end-to-end test mostly waits (Flower's polling, heartbeats, process start-up), so
# two of them share two cores well. Each test file runs on one worker, so a module's shared
# federation starts once; the deployment's file (the longest) starts first.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Side-by-side benchmarks (benchmarks/README.md): writes benchmarks/results.json and results.md,
# scratch data under outputs/bench. Never part of `make test`: timings on shared machines vary.
bench: setup
	$(BIN)/python benchmarks/run.py

bench-quick: setup
	$(BIN)/python benchmarks/run.py --quick

# On a site's GPU machine: plain and DP-SGD epochs of each preset on its CPU and its GPU (bench_gpu.py).
bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py

clean:
	rm -rf outputs
