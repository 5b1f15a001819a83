# The few commands people run; docs/conformance.md explains the gates.
PYTHON ?= python

.PHONY: test typecheck conformance conformance-all bench conformance-socket

test:
	$(PYTHON) -m pytest

# Static types of connmix_tx/ (mypy.ini: mypy-zope for the Twisted interfaces; tests/ stay out).
typecheck:
	$(PYTHON) -m mypy

# Autobahn|Testsuite against the echo entry: the fast set CI runs (1-7, 10, 12, 13 without the
# heavy 12.x/13.x cases), then everything (1-13 with 9.x and every 12.x/13.x case).  The first
# run installs the testsuite into .conformance/.
conformance:
	$(PYTHON) conformance/run.py --install --strict

conformance-all:
	$(PYTHON) conformance/run.py --install --all --strict

# The same echo over a socket server framed by lua/protocols/websocket.lua (not a CI gate yet:
# see docs/conformance.md for its known failures).
conformance-socket:
	$(PYTHON) conformance/run.py --install --server socket --cases 1-7,10

# Benchmarks against raw Autobahn in the same run (docs/performance.md): a few minutes;
# `make bench BENCH_ARGS=--quick` for about a minute.
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)
