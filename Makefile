# Two commands: `make demo` (train + evaluate DeepLab v3 on the synthetic set)
# and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flaxseg-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,parity]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config=configs/deeplabv3.py:demo --workdir=$(DEMO_DIR)

# --dist loadfile: each test file on one worker, so a module's fixtures (a
# trained tiny run, generated data) are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
