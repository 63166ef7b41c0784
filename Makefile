# ctiqa — two commands: `make demo` (offline end-to-end job on the CPU) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch is pinned here so a fresh machine does not pull a multi-GB CUDA build for the demo.
# On a GPU box install the project with your CUDA torch instead: `pip install -e .[dev]`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-rl test lint clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ctiqa.demo

# GRPO after the demo's SFT (needs `make demo` first): runs/demo/rl/ and runs/demo/report-rl.md (SFT vs SFT + GRPO)
demo-rl: install
	$(PY) -m ctiqa.demo_rl

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check ctiqa datasets_builder recipes tests bench

clean-demo:
	rm -rf runs/demo
