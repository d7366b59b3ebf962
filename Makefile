# A newcomer needs `make demo` and `make test` (`make zoo`: every method). Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo zoo test clean

# -qq: errors only; setuptools' notice about editable installs is noise for a newcomer.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/misalign demo --out demo

# Every variant trained with the CPU defaults, dumped, and compared with the counterfactual
# rescoring (docs/methods.md, "Zoo results"): about 50 minutes on two cores, resumable.
zoo: $(STAMP)
	$(BIN)/misalign demo --models all --rescore --out zoo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo zoo
