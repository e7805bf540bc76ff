# The README's two commands: `make demo` (run the app on a generated example) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Generate a small example BIDS dataset, run the participant level, then the group level.
demo: $(STAMP)
	rm -rf example
	$(BIN)/qsmrim-synth example/bids --subjects 3 --seed 1 --rimplus-fraction 0.3
	$(BIN)/qsmrim example/bids example/derivatives/qsmrim participant --nprocs 2 -w example/work
	$(BIN)/qsmrim example/bids example/derivatives/qsmrim group
	@echo "Results: example/derivatives/qsmrim. Open group_report.html first: its 'Agreement with expert counts'"
	@echo "table puts the model's rim+ counts beside the example's truth; then sub-01.html. What to expect: docs/demo.md"

# Every test, slow ones included (what CI runs); the ten slowest are listed at the end of the log.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=10 $(PYTEST_ARGS)

# The quick inner loop: everything not marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) example build *.egg-info
