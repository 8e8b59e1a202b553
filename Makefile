# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned here (a CPU build lies on this machine's disk); the library itself asks for a range.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loraq demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)  # about an hour on 2 cores; each script can be run alone
	$(BIN)/python bench/steps.py --setups loraq-qlora,loraq-lora,peft-lora,peft-qlora --steps 5
	$(BIN)/python bench/qlora.py
	$(BIN)/python bench/perplexity.py
	$(BIN)/python bench/qalora.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/fsdp.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
