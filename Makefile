# The two commands of the quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
YAGG := $(BIN)/yagg
DEMO := runs/demo

.PHONY: test demo lint clean-demo bench bench-quick

# Reinstalls when setup.py changes.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n auto --dist loadgroup tests

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole main job on the built-in moving-shapes dataset, on CPU: data, preprocessing (Beam), training, evaluation
# (GIFs, scores, gallery) and a few samples, all under $(DEMO). Rerunning resumes: training and evaluation pick up
# where they stopped. DEMO (the workdir), DEMO_CLIPS (clips in the dataset) and DEMO_OVERRIDES (`--config.FIELD=VALUE`
# for training and evaluation) can be set on the command line; tests/test_demo.py runs a shortened demo that way.
DEMO_CLIPS := 1024
DEMO_OVERRIDES :=
DEMO_CONFIG = --config configs/demo.py --config.data.path=$(DEMO)/data --config.data.text_encoder=$(DEMO)/tiny-clip \
	$(DEMO_OVERRIDES)

demo: $(VENV)/.installed
	$(YAGG) make-tiny-clip --out $(DEMO)/tiny-clip
	$(YAGG) make-shapes --out $(DEMO)/shapes --num $(DEMO_CLIPS) --seed 0
	$(YAGG) preprocess --config configs/demo.py --manifest $(DEMO)/shapes/manifest.tsv --output $(DEMO)/data \
		--text-encoder $(DEMO)/tiny-clip --overwrite
	$(YAGG) train $(DEMO_CONFIG) --workdir $(DEMO)
	$(YAGG) sample --workdir $(DEMO) --out $(DEMO)/gifs/sample.gif --scale 8 \
		"a red circle moving left" "a magenta triangle moving up" "a red triangle moving up"
	$(YAGG) eval $(DEMO_CONFIG) --workdir $(DEMO)

# Benchmarks (bench/): a measured ratio per stage, written to bench/results/latest.json and latest.md.
bench: $(VENV)/.installed
	$(BIN)/python -m bench.run

bench-quick: $(VENV)/.installed
	$(BIN)/python -m bench.run --quick

clean-demo:
	rm -rf $(DEMO)
