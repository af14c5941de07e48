# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install clean teachers-eval

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/graftkd demo

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# Re-measure every registered teacher on the shared lossless test split (needs ../shared or your own copies).
TEACHERS_DIR ?= ../shared/teachers
DATA_DIR ?= ../shared/data
teachers-eval: install
	for t in vgg16bn-cifar10 resnet20-cifar10 resnet32-cifar10 resnet44-cifar10 resnet56-cifar10; do \
	  GRAFTKD_DATA=$(DATA_DIR) $(VENV)/bin/graftkd evaluate --teacher $$t --teachers-dir $(TEACHERS_DIR) \
	    --no-progress --out results/teachers/$$t.json || exit 1; done
