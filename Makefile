PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned and installed first, so that pip does not resolve (and download)
# another multi-GB torch build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-fast lint demo demo-official clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests

# The inner loop: everything but the end-to-end demo, wheel and multi-process runs (marked slow).
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow" -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

demo: $(VENV)/.installed
	$(PY) -m illm.demo

# The official MS-ILLM and No-GAN weights beside JPEG on the held-out photos (downloads them once).
demo-official: $(VENV)/.installed
	$(PY) -m illm.demo --official --output demo_official

clean:
	rm -rf $(VENV) demo_output demo_official .pytest_cache
