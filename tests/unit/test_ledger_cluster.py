"""The ledger's cluster DDL (sinks/cluster.py), parsed by the embedded ClickHouse engine.

No ClickHouse server runs here, so a cluster cannot execute these statements; chdb's parser
(``formatQuery``) proves each one is valid ClickHouse SQL, and the assertions pin what it says.
chdb runs in a child process: it allows one engine instance per process, and other tests open their
own ledgers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sinks.cluster import SESSION_SETTINGS, ClusterDDLError, cluster_ddl, cluster_migrations
from sinks.columns import COLUMNS
from sinks.errors import LedgerError
from sinks.ledger import MIGRATIONS_TABLE_DDL, Ledger
from sinks.schema import MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]
# What the single-server migrations create (the list grows; the tests follow it).
ORIGINALS = [s for _v, _n, statements in MIGRATIONS for s in statements]
TABLES = sorted(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", "\n".join(ORIGINALS)))
VIEWS = sorted(re.findall(r"CREATE VIEW IF NOT EXISTS (\w+)", "\n".join(ORIGINALS)))
# A later migration may replace a view (CREATE OR REPLACE VIEW) with more columns.
_VIEW_NAME = re.compile(r"CREATE (?:OR REPLACE )?VIEW (?:IF NOT EXISTS )?(\w+)")

_CHDB = r"""
import json, sys
import chdb
job = json.load(sys.stdin)
out = {"formatted": [], "settings_ok": None, "default": None}
for statement in job["statements"]:
    # A query parameter's value is read in TSV's escaped form.
    value = statement.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    out["formatted"].append(
        chdb.query("SELECT formatQuery({q:String})", "TSVRaw", params={"q": value}).bytes().decode()
    )
if job["settings"]:
    settings = job["settings"].items()
    assignments = ", ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings)
    names = ", ".join(repr(k) for k in job["settings"])
    sql = f"SELECT name FROM system.settings WHERE name IN ({names}) SETTINGS {assignments}"
    out["settings_ok"] = sorted(r["name"] for r in json.loads(chdb.query(sql, "JSON").bytes())["data"])
if job.get("ledger_path"):
    from sinks.ledger import Ledger
    ledger = Ledger.open("chdb://" + job["ledger_path"])
    out["default"] = {
        "tables": ledger.query(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name"
        ),
        "versions": ledger.query("SELECT version FROM schema_migrations ORDER BY version"),
    }
    ledger.close()
json.dump(out, sys.stdout)
"""


def _chdb(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHDB],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


@pytest.fixture(scope="module")
def generated() -> list[str]:
    statements = cluster_ddl(MIGRATIONS_TABLE_DDL, "ledger", "billing")
    for _version, _name, clustered in cluster_migrations(MIGRATIONS, "ledger", "billing"):
        statements.extend(clustered)
    return statements


@pytest.fixture(scope="module")
def parsed(generated: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ledger_path = tmp_path_factory.mktemp("ledger") / "clickhouse"
    return _chdb({"statements": generated, "settings": SESSION_SETTINGS, "ledger_path": str(ledger_path)})


def test_every_clustered_statement_of_every_migration_parses(
    generated: list[str], parsed: dict[str, Any]
) -> None:
    formatted = parsed["formatted"]
    assert len(formatted) == len(generated)
    for statement, text in zip(generated, formatted, strict=True):
        assert text.strip(), statement
        # The parser kept the cluster clause: nothing was silently dropped.
        assert " ON CLUSTER ledger" in _one_line(text), text


def test_each_table_becomes_a_replicated_local_table_and_a_distributed_one(parsed: dict[str, Any]) -> None:
    creates = [_one_line(t) for t in parsed["formatted"] if t.startswith("CREATE TABLE")]
    local = {}
    distributed = {}
    for text in creates:
        name = text.split()[5]
        if name.endswith("_local"):
            engine = re.search(
                r"ENGINE = (\w+)\('/clickhouse/tables/\{shard\}/\{database\}/(\w+)', '\{replica\}'", text
            )
            assert engine is not None, text
            assert engine[2] == name.removesuffix("_local")
            local[name.removesuffix("_local")] = engine[1]
        else:
            engine = re.search(r"ENGINE = Distributed\(ledger, billing, (\w+)_local, (.+)\)$", text)
            assert engine is not None, text
            assert engine[1] == name
            distributed[name] = engine[2]
    assert set(COLUMNS) <= set(TABLES)
    assert local == {
        "schema_migrations": "ReplicatedMergeTree",
        **{name: "ReplicatedReplacingMergeTree" for name in TABLES},
    }
    chosen = {
        "schema_migrations": "version",
        "raw_events": "cityHash64(tenant_id)",
        "rated_calls": "cityHash64(tenant_id)",
        "provisioning_events": "cityHash64(tenant_id)",
        "rating_corrections": "cityHash64(tenant_id)",
        "invoices": "cityHash64(tenant_id)",
        "adjustments": "cityHash64(tenant_id)",
        "dead_letters": "cityHash64(source_topic, source_partition)",
        "invoice_lines": "cityHash64(invoice_id)",
        "catalogs": "revision",
    }
    # Tables of later migrations: by tenant where they have one (sinks/cluster.py for the others).
    assert distributed == {
        **{name: "cityHash64(tenant_id)" for name in TABLES if "tenant_id" in COLUMNS.get(name, ())},
        **chosen,
    }


def test_deduplication_window_is_the_replicated_one(generated: list[str]) -> None:
    text = "\n".join(generated)
    assert "non_replicated_deduplication_window" not in text
    windows = "\n".join(ORIGINALS).count("non_replicated_deduplication_window = 1000")
    assert windows >= 5
    assert text.count("replicated_deduplication_window = 1000") == windows


def test_alters_go_to_the_local_table_and_column_changes_to_the_distributed_one() -> None:
    by_version = {v: s for v, _n, s in cluster_migrations(MIGRATIONS, "ledger", "billing")}
    assert [_one_line(s) for s in by_version[4]] == [
        "ALTER TABLE dead_letters_local ON CLUSTER ledger ADD COLUMN IF NOT EXISTS value_digest UInt64, "
        "MODIFY ORDER BY (source_topic, source_partition, source_offset, value_digest)",
        "ALTER TABLE dead_letters ON CLUSTER ledger ADD COLUMN IF NOT EXISTS value_digest UInt64",
    ]
    assert [_one_line(s) for s in by_version[2][:2]] == [
        "ALTER TABLE invoices_local ON CLUSTER ledger ADD COLUMN IF NOT EXISTS status LowCardinality(String) "
        "DEFAULT 'draft'",
        "ALTER TABLE invoices ON CLUSTER ledger ADD COLUMN IF NOT EXISTS status LowCardinality(String) "
        "DEFAULT 'draft'",
    ]


def test_views_keep_their_names_and_read_the_distributed_tables() -> None:
    views = [
        s
        for _v, _n, stmts in cluster_migrations(MIGRATIONS, "ledger", "billing")
        for s in stmts
        if "VIEW" in s
    ]
    originals = [s for s in ORIGINALS if "VIEW" in s]
    assert len(views) == len(originals) >= len(VIEWS) >= 9
    replaced = [s for s in originals if s.startswith("CREATE OR REPLACE VIEW")]
    assert len(originals) == len(VIEWS) + len(replaced)
    for view, original in zip(views, originals, strict=True):
        match = _VIEW_NAME.match(original)
        assert match is not None and match[1] in VIEWS, original[:60]
        assert view.startswith(f"{match[0]} ON CLUSTER ledger AS")
        assert "_local" not in view


def test_a_later_migration_is_transformed_too() -> None:
    # The shape of the next migrations (a new table, new columns): no change to sinks/cluster.py needed.
    tables: set[str] = set()
    new_table = cluster_ddl(
        "CREATE TABLE IF NOT EXISTS duplicates (tenant_id String, event_id String, gateway_id String, "
        "seen_at DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree ORDER BY (tenant_id, event_id, seen_at) "
        "SETTINGS non_replicated_deduplication_window = 1000",
        "ledger",
        "billing",
        tables,
    )
    assert new_table[1] == (
        "CREATE TABLE IF NOT EXISTS duplicates ON CLUSTER ledger AS duplicates_local "
        "ENGINE = Distributed(ledger, billing, duplicates_local, cityHash64(tenant_id))"
    )
    no_tenant = cluster_ddl(
        "CREATE TABLE t (a String, b UInt8) ENGINE = MergeTree ORDER BY (a, b)", "ledger", "billing", tables
    )
    assert no_tenant[1].endswith("Distributed(ledger, billing, t_local, cityHash64(a, b))")
    alter = cluster_ddl(
        "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS tenant_id Nullable(String), "
        "ADD COLUMN IF NOT EXISTS gateway_id LowCardinality(String) DEFAULT ''",
        "ledger",
        "billing",
    )
    commands = (
        "ADD COLUMN IF NOT EXISTS tenant_id Nullable(String), "
        "ADD COLUMN IF NOT EXISTS gateway_id LowCardinality(String) DEFAULT ''"
    )
    assert alter == [
        f"ALTER TABLE dead_letters_local ON CLUSTER ledger {commands}",
        f"ALTER TABLE dead_letters ON CLUSTER ledger {commands}",
    ]
    assert cluster_ddl("DROP TABLE IF EXISTS duplicates", "ledger", "billing", tables) == [
        "DROP TABLE IF EXISTS duplicates ON CLUSTER ledger SYNC",
        "DROP TABLE IF EXISTS duplicates_local ON CLUSTER ledger SYNC",
    ]
    parsed = _chdb({"statements": [*new_table, *no_tenant, *alter], "settings": {}})
    assert all(" ON CLUSTER ledger" in _one_line(text) for text in parsed["formatted"])


@pytest.mark.parametrize(
    ("statement", "cluster", "reason"),
    [
        ("INSERT INTO catalogs SELECT 1, '', '', now()", "ledger", "cannot place"),
        ("CREATE MATERIALIZED VIEW m TO t AS SELECT 1", "ledger", "cannot place"),
        ("CREATE TABLE t (a UInt8) ENGINE = ReplicatedMergeTree ORDER BY a", "ledger", "already replicated"),
        ("CREATE VIEW v AS SELECT 1", "ledger; DROP TABLE x", "plain identifiers"),
    ],
)
def test_what_the_transform_cannot_place_is_refused(statement: str, cluster: str, reason: str) -> None:
    with pytest.raises(ClusterDDLError, match=reason):
        cluster_ddl(statement, cluster, "billing")


def test_an_alter_of_something_no_migration_created_as_a_table_is_refused() -> None:
    later = [*MIGRATIONS, (99, "alter a view", ["ALTER TABLE usage_daily MODIFY COMMENT 'x'"])]
    with pytest.raises(ClusterDDLError, match=r"^cannot place ALTER TABLE usage_daily on a cluster"):
        cluster_migrations(later, "ledger", "billing")


def test_session_settings_exist_and_take_their_values(parsed: dict[str, Any]) -> None:
    assert parsed["settings_ok"] == sorted(SESSION_SETTINGS)
    assert SESSION_SETTINGS["insert_distributed_sync"] == 1


def test_without_a_cluster_the_ledger_is_created_as_before(parsed: dict[str, Any]) -> None:
    # A real embedded ledger migrated with no cluster: the plain engines, no _local or Distributed
    # tables, every migration recorded.
    default = parsed["default"]
    tables = {name: engine for name, engine in default["tables"]}
    views = {name for name, engine in tables.items() if engine == "View"}
    assert {name: engine for name, engine in tables.items() if engine != "View"} == {
        "schema_migrations": "MergeTree",
        **{name: "ReplacingMergeTree" for name in TABLES},
    }
    assert sorted(views) == VIEWS
    assert [v for (v,) in default["versions"]] == [version for version, _n, _s in MIGRATIONS]


def test_a_cluster_needs_a_server() -> None:
    with pytest.raises(
        LedgerError, match=r"^clickhouse_cluster needs a ClickHouse server \(CALLMETER_CLICKHOUSE_URL\)"
    ):
        Ledger.open("chdb:///nonexistent/clickhouse", cluster="ledger")
