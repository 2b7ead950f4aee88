# Two commands do everything: `make train` (the chapter's baseline, tracked in
# runs/mlflow.db) and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The team's offline CIFAR-10 copy, used when present; elsewhere torchvision downloads it.
CIFAR_ARCHIVE ?= $(wildcard ../shared/datasets/cifar10-jpg.tar.gz)
DATA_ARGS ?= $(if $(CIFAR_ARCHIVE),data.archive=$(abspath $(CIFAR_ARCHIVE)))

.PHONY: install train summary test test-slow bench lint ui clean

# torch/torchvision first, pinned to the pair that lies on the team's machines' disk.
$(BIN)/cnnlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/cnnlab

train: install  ## train the chapter's CIFAR-10 baseline (5 epochs), tracked in runs/mlflow.db
	$(BIN)/cnnlab train $(DATA_ARGS) $(ARGS)

summary: install
	$(BIN)/cnnlab summary $(ARGS)

test: install  ## fast, offline tests (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: install  ## slow and real-data tests
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/epoch_time.py $(ARGS)

lint: install
	$(BIN)/ruff check cnnlab tests benchmarks

ui: install  ## the MLflow dashboard for the embedded store
	$(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///runs/mlflow.db

clean:
	rm -rf runs/outputs runs/multirun
