# The two set-up commands of the README. Each makes the project virtualenv (.venv) by itself.
#   make demo   the main job on its embedded defaults
#   make test   the whole test suite (what CI runs, through .ci/run)

PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a GPU cluster uses the Dockerfile (NGC base image) instead.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean system-deps

# Debian packages the tests use: chromium (the generated page is rendered headless) and Slurm
# (tests/slurm starts a two-node cluster on this machine; its daemons run as root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,hf,wandb]"
	touch $@

# The toy any-to-any model end to end: runs/demo/index.html and runs/demo/metrics.json (rerun to resume).
demo: $(STAMP)
	$(BIN)/omni demo --out runs/demo

system-deps:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@{ command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null; }

test: $(STAMP) system-deps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs/demo
