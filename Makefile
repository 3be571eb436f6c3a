# Common targets. `make demo` and `make test` set themselves up on a fresh machine:
# a virtual environment in .venv, the CPU build of torch, and qa-dist with its dev extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On CPU machines torch must be the CPU wheel, installed before anything that depends on torch;
# an unpinned torch resolves to the CUDA build (gigabytes). On GPU machines: make TORCH=torch
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.qa-dist-installed

.PHONY: setup demo test test-fast test-gpu bench-gpu lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the whole pipeline on the shipped samples, offline, on 2 CPU processes.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/qa-dist demo

test: $(STAMP)
	$(BIN)/ruff check qa_dist tests bench examples
	$(BIN)/ruff format --check qa_dist tests bench examples
	$(BIN)/pytest -q -ra --durations=40

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not multiprocess"

# The GPU tier on every visible GPU (NCCL; 2+ processes where there are 2+ GPUs): DDP, FSDP, ZeRO-2/3
# in bf16, exact resume, evaluation on 1 and N GPUs, the export check. Skips where no GPU is visible.
test-gpu: $(STAMP)
	$(BIN)/pytest -q -ra -m gpu tests/gpu

# Per GPU: samples/s, tokens/s, peak memory and MFU of BERT-large at 384 tokens in bf16, each strategy
# beside the Hugging Face Trainer. Exits with a message where no GPU is visible.
bench-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check qa_dist tests bench examples
	$(BIN)/ruff format --check qa_dist tests bench examples

format: $(STAMP)
	$(BIN)/ruff check --fix qa_dist tests bench examples
	$(BIN)/ruff format qa_dist tests bench examples

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/preprocess.py --one-core --scale
	$(BIN)/python bench/cache_open.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/postprocess.py
	$(BIN)/python bench/gather_bytes.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/trainer_compare.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/compile.py
	$(BIN)/python bench/span_compile.py

clean:
	rm -rf .qa-dist-cache runs .pytest_cache .ruff_cache
