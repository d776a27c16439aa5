# The two commands of the quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
YAGG := $(BIN)/yagg
DEMO := runs/demo

.PHONY: test demo lint clean-demo

# Reinstalls when setup.py changes.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q tests

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(VENV)/.installed
	$(YAGG) make-tiny-clip --out $(DEMO)/tiny-clip
	$(YAGG) make-shapes --out $(DEMO)/shapes --num 512 --seed 0
	$(YAGG) preprocess --config configs/demo.py --manifest $(DEMO)/shapes/manifest.tsv \
		--text-encoder $(DEMO)/tiny-clip --output $(DEMO)/data --overwrite

clean-demo:
	rm -rf $(DEMO)
