# Everything a fresh machine needs is installed from here: the venv, the package, and (on first use)
# Apache Kafka's jars from Maven Central. `make demo` and `make test` are the two entry points.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup kafka-jars promtool demo test test-unit chaos chaos-busy lint bench clean

setup: $(STAMP) kafka-jars

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "Java 17+ is required (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is required to fetch Kafka (apt-get install maven)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Fetch Kafka once into the cache dir; later starts are offline.
kafka-jars: $(STAMP)
	$(BIN)/python -c "from pipeline.local.broker import LocalKafka; from pipeline.settings import Settings; LocalKafka(Settings()).fetch()"

# promtool checks and unit-tests deploy/prometheus/ (tests/unit/test_observability_config.py); Debian's
# prometheus package provides it. Installing needs root when it is missing (CI and dev machines are).
promtool:
	sh deploy/install-promtool.sh

demo: setup
	$(BIN)/callmeter demo

# The fault-injection scenarios marked `chaos` are slow; make test runs their fast subset. Two test
# processes (pytest-xdist), a file each at a time, each with its own session broker: the end-to-end tests
# mostly wait on Kafka, Faust and process start-up, so two share the 2 cores without slowing each other.
# The chaos scenarios run one at a time: several of them load the machine on purpose.
test: setup promtool
	$(BIN)/pytest -q -m "not chaos" -n 2 --dist loadfile --durations=15

chaos: setup
	$(BIN)/pytest -q -m chaos

# The same scenarios on a busy machine: CPU hogs beside each, keeping the load average near four times
# the cores (tests/busy.py; CALLMETER_CHAOS_BUSY_HOGS sets their number). Each must still end with exit
# 0, exact invoices and at most one restart per injected fault.
chaos-busy: setup
	CALLMETER_CHAOS_BUSY=1 $(BIN)/pytest -q -m chaos

test-unit: setup promtool
	$(BIN)/pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy schemas pipeline rating sinks bench

# One table, every row measured in this run on the same broker (bench/table.py): the bare Faust
# agent, the straightforward stateful agent (the baseline of every ratio), the raw confluent-kafka
# transactional loop, `worker --until-idle` with 1 and 2 worker processes, replay, and balance latency,
# on BENCH_CALLS records each; also written to docs/bench-results.md. BENCH_FLAGS="--rss-at
# 1000000,3000000" adds the peak-RSS rows at those sizes (slow: about half an hour per million today).
BENCH_CALLS ?= 100000
BENCH_FLAGS ?=
bench: setup
	$(BIN)/python -m bench.table --calls $(BENCH_CALLS) --processes 1,2 $(BENCH_FLAGS)

clean:
	-$(BIN)/callmeter down
	rm -rf .callmeter out
