# The two commands of the README. Each creates .venv when missing and installs into it; a second run
# installs nothing (the stamp file is newer than pyproject.toml and constraints.txt).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.knowlip-installed

.PHONY: quickstart quickstart-slurm test install cluster-packages clean

quickstart: $(STAMP)
	bash launch/quickstart.sh

# Optional: the same job through a real local Slurm (needs root for the Debian packages on first use).
quickstart-slurm: $(STAMP)
	bash launch/quickstart_slurm.sh

# The Slurm tests run against a real local cluster and the MLflow UI test uses headless Chromium: their Debian
# packages are installed when missing (as root).
test: $(STAMP) cluster-packages
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

cluster-packages:
	bash cluster/local/install.sh chromium

install: $(STAMP)

# torch first and pinned (the CPU wheel on disk here; PyPI's CUDA build on a GPU machine), then the package
# with --no-build-isolation so that DeepSpeed's setup sees that torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf runs/quickstart .pytest_cache
