# anytoken — `make demo` runs the end-to-end demo on this machine, `make test` runs the tests.
# Each installs what it needs into .venv first; a second run with nothing changed installs nothing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-quick install system-deps clean serve

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# espeak-ng speaks the demo's digit words; installed from Debian's packages where we can, explained where not.
# A second make started beside the first (make demo and make test at once) waits for its apt-get to finish.
APT_WAIT := -o DPkg::Lock::Timeout=300
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing espeak-ng (Debian package)"; \
	    apt-get install -y -q $(APT_WAIT) espeak-ng >/dev/null 2>&1 || { apt-get update -q $(APT_WAIT) >/dev/null && apt-get install -y -q $(APT_WAIT) espeak-ng >/dev/null; }; \
	  else \
	    echo "espeak-ng is missing. Install it (Debian/Ubuntu: sudo apt-get install espeak-ng;" \
	         "macOS: brew install espeak-ng) and run make again." >&2; exit 1; \
	  fi; }

install: $(STAMP) system-deps

demo: install    # every step of the mission on a local Ray; a second run skips what is done (anytoken demo --help)
	$(BIN)/anytoken demo --out $(DEMO)

serve: install    # the demo's exported model on http://127.0.0.1:8000 (anytoken serve --help for the keys)
	$(BIN)/anytoken serve --model $(DEMO)/model

test: install
	$(BIN)/python -m pytest

test-quick: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
