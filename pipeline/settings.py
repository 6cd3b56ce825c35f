"""The one settings model. Every knob is an environment variable ``CALLMETER_<NAME>`` or a CLI flag."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SAMPLE_CATALOG = Path(__file__).with_name("catalog.yaml")
KAFKA_VERSION = "4.3.1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLMETER_", extra="ignore")

    data_dir: Path = Path(".callmeter")
    catalog: Path = SAMPLE_CATALOG
    # Bootstrap servers of an existing cluster; unset means the local broker started by `callmeter up`.
    kafka: str | None = None
    # chdb:///path (embedded, the default: <data_dir>/clickhouse) or http(s)://user@host:port/db.
    clickhouse_url: str | None = None
    clickhouse_password: SecretStr | None = None
    # A cluster defined in the servers' remote_servers: the ledger's migrations then create each table
    # as a Replicated <name>_local on every node and a Distributed <name> over them, sharded by tenant
    # (sinks/cluster.py, docs/deployment.md). Needs clickhouse_url; unset is one server.
    clickhouse_cluster: str | None = None
    schema_registry_url: str | None = None
    schema_registry_basic_auth: SecretStr | None = None
    # Lets several isolated pipelines (tests, staging) share one cluster.
    topic_prefix: str = ""
    partitions: int = 6
    dedupe_retention_days: int = 40
    parking_timeout_seconds: int = 3600
    # An event dated more than this past the time Kafka stamped on its record (the broker's append time
    # on the topics callmeter creates) is dead-lettered FUTURE_EVENT: a clock fault, not usage. One
    # billing period by default; lower it where gateways' clocks are disciplined (docs/decisions.md,
    # "Future-dated events").
    future_tolerance_seconds: int = Field(default=31 * 86_400, ge=0)
    settlement_window_hours: int = 48
    # --until-idle: how long nothing new must arrive before the worker exits.
    idle_seconds: float = 2.0
    kafka_version: str = KAFKA_VERSION
    cache_dir: Path = Path.home() / ".cache" / "callmeter"
    worker_web_port: int = 6066
    # Where the worker's HTTP API (/metrics, /status, /balances) listens: loopback unless a container
    # or a scraper on another host needs it (0.0.0.0), and the host name other workers reach it by (a
    # balance request is forwarded to the worker owning the tenant's partition).
    worker_web_bind: str = "127.0.0.1"
    worker_web_host: str = "127.0.0.1"
    # `callmeter worker` also answers /authorize, /quota and /balances on this port (on worker_web_bind),
    # from its supervising process's view of the committed changelogs (pipeline/tenantapi/): nothing
    # there does stream work, so a gateway's pre-call question does not wait behind a busy event loop.
    # Answers are as of the workers' last commit (about a second). Unset: only the workers' endpoints.
    api_port: int | None = None
    # Stream worker processes `callmeter worker` runs. With more than one, the ledger sink runs as a
    # process of its own beside them (chdb opens a path in one process only). Process i serves its
    # web API on worker_web_port + i and keeps its local state in <data_dir>/worker-<i>. One per core by
    # default (issue 10): a Faust worker is one Python thread, so a process per core is what scales, and
    # the ledger sink then gets a process of its own instead of sharing the worker's GIL.
    worker_processes: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1))
    # false: `callmeter worker` runs stream workers only and a `callmeter sink` service (exactly one)
    # writes the ledger: N worker services on several hosts and one sink (docs/deployment.md).
    worker_ledger_sink: bool = True
    # Set by `callmeter worker` for each process it starts; not an operator setting.
    worker_index: int = 0
    sink_batch_rows: int = 20000
    # The sink retries a ledger that refuses inserts (server restarting, disk full) this long before it
    # stops the worker with an error; nothing is committed meanwhile.
    ledger_outage_seconds: float = 300.0
    # Worker producers (changelogs, outputs) batch this long: fewer, larger produce requests. It adds
    # at most this much to the time before output is committed; balances read local state at once.
    producer_linger_ms: int = 100
    log_level: str = "warning"
    # `callmeter worker` restarts a worker process that stopped on a recoverable fault this many times
    # in a row before it gives up (pipeline/commands/supervisor.py).
    worker_restarts: int = 5
    # A worker with input left to consume that commits nothing for this long (broker gone, a hung
    # partition) stops and is restarted; the restart fails with one line if the broker is still away.
    stall_timeout_seconds: float = 120.0
    # The instant the invoice job takes as "now" (which periods have ended, the settlement window):
    # unset is the wall clock. For rehearsing a month end and for tests of fixtures dated in the future.
    clock_now: datetime | None = None
    # `callmeter notify`: every alert POSTed is signed with HMAC-SHA256 of this secret (required). An
    # attempt that does not answer 2xx within notify_timeout_seconds is retried after 0.5, 1, 2, ... s
    # (capped at notify_max_backoff_seconds); after notify_max_attempts failures of one alert the
    # notifier stops non-zero with that alert uncommitted (docs/decisions.md, "Alert delivery").
    notify_secret: SecretStr | None = None
    notify_timeout_seconds: float = 10.0
    notify_max_attempts: int = 10
    notify_initial_backoff_seconds: float = 0.5
    notify_max_backoff_seconds: float = 30.0

    @property
    def worker_state_dir(self) -> Path:
        return self.data_dir / ("worker" if self.worker_index == 0 else f"worker-{self.worker_index}")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def topics(self) -> Topics:
        return Topics(self)

    @property
    def app_id(self) -> str:
        suffix = re.sub(r"[^A-Za-z0-9_-]", "-", self.topic_prefix).strip("-")
        return f"callmeter-{suffix}" if suffix else "callmeter"

    @property
    def clickhouse_secret(self) -> str | None:
        """The ClickHouse password in clear, for the client that needs it (never logged)."""
        return self.clickhouse_password.get_secret_value() if self.clickhouse_password else None

    @property
    def clickhouse_dsn(self) -> str:
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"


class Topics:
    """Topic names under the configured prefix. Inputs share one partition count (co-partitioned)."""

    def __init__(self, settings: Settings) -> None:
        p = settings.topic
        self.calls = p("calls")
        self.provisioning = p("provisioning")
        self.rated = p("calls.rated")
        self.accepted = p("provisioning.accepted")
        self.alerts = p("alerts")
        self.deadletter = p("deadletter")
        self.duplicates = p("duplicates")

    @property
    def inputs(self) -> list[str]:
        return [self.calls, self.provisioning]

    @property
    def all(self) -> list[str]:
        return [*self.inputs, self.rated, self.accepted, self.alerts, self.deadletter, self.duplicates]

    @property
    def ledger_inputs(self) -> list[str]:
        """The worker outputs the ledger sink writes to ClickHouse."""
        return [self.rated, self.accepted, self.deadletter, self.duplicates]
