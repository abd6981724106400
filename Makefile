# The two commands of the README. Both build .venv from pyproject.toml first (again when it changes).
VENV := .venv
PY := $(VENV)/bin/python
# Real images for the demo and the tests: Debian's Fashion-MNIST (70,000 labelled 28x28 images, installed offline).
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m jobs.pipeline

test: $(VENV)/.installed $(FASHION_MNIST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not gpu" --durations=15 -n 2 --dist loadfile
