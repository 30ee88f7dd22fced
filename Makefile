# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU torch wheel lies on disk on the development machines; elsewhere pip finds it on its index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install serve test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(FIND_LINKS) torch==2.13.0
	$(PIP) install --quiet $(FIND_LINKS) -e '.[dev]'
	# Only the CLIP BPE vocabulary file is used from open-clip (to build a real tokenizer offline).
	$(PIP) install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

serve: install
	$(PY) -m realcustom generate --model tiny --image ../shared/fixtures/dreambench/cat.jpg \
		--prompt "a cat in the snow" --target cat --out outputs/cat_snow.png \
		--mask-out outputs/cat_snow_mask.png --seed 0 --steps 4 --width 256 --height 256

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not gpu" -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache
