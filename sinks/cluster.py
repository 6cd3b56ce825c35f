"""The ledger's DDL for a ClickHouse cluster, derived from the single-server migrations (sinks/schema.py).

With ``clickhouse_cluster`` set, sinks/ledger.py applies ``cluster_migrations(MIGRATIONS, ...)``
instead of ``MIGRATIONS``. Each statement is transformed, not hand-copied, so a migration appended
to sinks/schema.py is clustered without touching this module:

- ``CREATE TABLE t (...) ENGINE = XMergeTree(args) ...`` becomes ``t_local ON CLUSTER`` with engine
  ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/t', '{replica}', args)``, plus a
  ``Distributed`` table named ``t`` (``ON CLUSTER``) over it, so every insert, query and view keeps
  using the name ``t``. ``non_replicated_deduplication_window`` becomes its replicated counterpart.
- ``ALTER TABLE t ...`` goes ``ON CLUSTER`` to ``t_local``; its column changes also go to ``t``
  (a Distributed table has the columns of its local table, and nothing else to alter).
- ``CREATE VIEW`` and ``DROP`` go ``ON CLUSTER``; views read the Distributed names.
- Anything else is refused with ``ClusterDDLError``: a statement this module cannot place on the
  cluster must not be run on one node by accident.

Sharding key (docs/deployment.md): every copy of a row's identity (its ReplacingMergeTree sorting
key) must land on one shard, or FINAL and argMax could not collapse the copies and money would be
counted twice. The key is therefore always a function of the sorting key: the tenant where the table
has ``tenant_id`` (each identity belongs to one tenant, and a tenant's reads stay on one shard), the
choices in ``SHARDING_KEYS`` for the others, and for a new table without either, a hash of its
whole sorting key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sinks.errors import LedgerError

LOCAL_SUFFIX = "_local"
ZOOKEEPER_PATH = "/clickhouse/tables/{shard}/{database}/"

# Tables without tenant_id. Each key is a function of the table's sorting key (see the docstring).
SHARDING_KEYS = {
    # Sorting key (source_topic, source_partition, source_offset[, value_digest]): one input
    # partition's dead letters on one shard, spread as the input is.
    "dead_letters": "cityHash64(source_topic, source_partition)",
    # All lines of one invoice on one shard: an invoice is read whole.
    "invoice_lines": "cityHash64(invoice_id)",
    # A few rows, one per catalog revision.
    "catalogs": "revision",
    # sinks/ledger.py's record of applied migrations.
    "schema_migrations": "version",
}

# Session settings of every ledger client on a cluster (sinks/ledger.py connect()).
SESSION_SETTINGS: dict[str, str | int] = {
    # An insert into a Distributed table returns only once every shard has stored its rows; without
    # this it returns once the rows are queued on the initiating node, and the sink would commit
    # Kafka offsets for rows not yet in the ledger (sinks/sink.py, step 3 of its protocol).
    "insert_distributed_sync": 1,
    # ... and only once a majority of each shard's replicas has them: a replica lost right after
    # the insert does not take committed rows with it.
    "insert_quorum": "auto",
    # Linearized quorum inserts, so that the reads below see every acknowledged insert. The ledger has
    # one writer at a time (the sink; the invoice job and replay write rarely).
    "insert_quorum_parallel": 0,
    # The sink's first-seen check (ledger.known_events) reads what it has just written: a replica
    # without the latest quorum insert refuses the read instead of answering from the past.
    "select_sequential_consistency": 1,
    # A query over a view may push an IN subquery over a Distributed table down to the shards;
    # GLOBAL evaluates it once and ships the result, right whatever the two tables are sharded by.
    "distributed_product_mode": "global",
}

_CREATE_TABLE = re.compile(
    r"^\s*CREATE\s+TABLE\s+(?P<ine>IF\s+NOT\s+EXISTS\s+)?(?P<name>\w+)\s*\((?P<columns>.*)\)\s*"
    r"ENGINE\s*=\s*(?P<engine>\w*MergeTree)\s*(?:\((?P<args>[^()]*)\))?(?P<rest>.*)$",
    re.DOTALL | re.IGNORECASE,
)
_ALTER_TABLE = re.compile(r"^\s*ALTER\s+TABLE\s+(?P<name>\w+)\s+(?P<commands>.*)$", re.DOTALL | re.IGNORECASE)
_CREATE_VIEW = re.compile(
    r"^\s*(?P<head>CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?)(?P<name>\w+)\s+"
    r"(?P<body>AS\s.*)$",
    re.DOTALL | re.IGNORECASE,
)
_DROP = re.compile(
    r"^\s*DROP\s+(?P<kind>TABLE|VIEW)\s+(?P<ie>IF\s+EXISTS\s+)?(?P<name>\w+)\s*$", re.DOTALL | re.IGNORECASE
)
_ORDER_BY = re.compile(r"\bORDER\s+BY\s+(?P<key>\([^()]*\)|\w+)", re.IGNORECASE)
_COLUMN_COMMAND = re.compile(r"^\s*(ADD|DROP|MODIFY|RENAME|COMMENT)\s+COLUMN\b", re.IGNORECASE)
_NON_REPLICATED = re.compile(r"\bnon_replicated_deduplication_window\b", re.IGNORECASE)


class ClusterDDLError(LedgerError):
    """A migration statement that cannot be placed on a cluster by the transform."""


def cluster_migrations(
    migrations: Sequence[tuple[int, str, list[str]]], cluster: str, database: str
) -> list[tuple[int, str, list[str]]]:
    """The migrations with every statement rewritten for ``cluster`` (tables in ``database``)."""
    tables: set[str] = set()
    return [
        (
            version,
            name,
            [out for statement in statements for out in cluster_ddl(statement, cluster, database, tables)],
        )
        for version, name, statements in migrations
    ]


def cluster_ddl(statement: str, cluster: str, database: str, tables: set[str] | None = None) -> list[str]:
    """One single-server statement as the statements that do the same on ``cluster``. ``tables``
    collects the names of the tables created so far (a DROP TABLE drops both of its tables)."""
    _check_identifier(cluster)
    _check_identifier(database)
    tables = set() if tables is None else tables
    on = f"ON CLUSTER {cluster}"
    if match := _CREATE_TABLE.match(statement):
        return _create_table(match, on, cluster, database, tables)
    if match := _ALTER_TABLE.match(statement):
        name = match["name"]
        if tables and name not in tables:
            # A view, or a table no migration created: there is no <name>_local to alter.
            msg = f"cannot place ALTER TABLE {name} on a cluster: no migration created a table {name}"
            raise ClusterDDLError(msg)
        commands = _split_top_level(match["commands"])
        local = [_NON_REPLICATED.sub("replicated_deduplication_window", c) for c in commands]
        out = [f"ALTER TABLE {name}{LOCAL_SUFFIX} {on} {', '.join(local)}"]
        columns = [c for c in commands if _COLUMN_COMMAND.match(c)]
        if columns:
            out.append(f"ALTER TABLE {name} {on} {', '.join(columns)}")
        return out
    if match := _CREATE_VIEW.match(statement):
        return [f"{match['head']}{match['name']} {on} {match['body']}"]
    if match := _DROP.match(statement):
        name, exists = match["name"], match["ie"] or ""
        if match["kind"].upper() == "VIEW" or name not in tables:
            return [f"DROP {match['kind']} {exists}{name} {on} SYNC"]
        tables.discard(name)
        return [f"DROP TABLE {exists}{name} {on} SYNC", f"DROP TABLE {exists}{name}{LOCAL_SUFFIX} {on} SYNC"]
    first = " ".join(statement.split())[:60]
    msg = f"cannot place this ledger migration statement on a cluster: {first} ... (extend sinks/cluster.py)"
    raise ClusterDDLError(msg)


def _create_table(match: re.Match[str], on: str, cluster: str, database: str, tables: set[str]) -> list[str]:
    name, columns, rest = match["name"], match["columns"], match["rest"]
    if match["engine"].lower().startswith("replicated"):
        msg = f"table {name} is already replicated; migrations are written for one server"
        raise ClusterDDLError(msg)
    ine = "IF NOT EXISTS " if match["ine"] else ""
    args = [f"'{ZOOKEEPER_PATH}{name}'", "'{replica}'"]
    if match["args"] and match["args"].strip():
        args.append(match["args"].strip())
    replicated_rest = _NON_REPLICATED.sub("replicated_deduplication_window", rest).strip()
    local = (
        f"CREATE TABLE {ine}{name}{LOCAL_SUFFIX} {on} ({columns}) "
        f"ENGINE = Replicated{match['engine']}({', '.join(args)}) {replicated_rest}"
    )
    key = sharding_key(name, columns, rest)
    distributed = (
        f"CREATE TABLE {ine}{name} {on} AS {name}{LOCAL_SUFFIX} "
        f"ENGINE = Distributed({cluster}, {database}, {name}{LOCAL_SUFFIX}, {key})"
    )
    tables.add(name)
    return [local, distributed]


def sharding_key(table: str, columns: str, rest: str) -> str:
    """The expression a table's rows are spread over the shards by (module docstring)."""
    if re.search(r"(^|[\s,(])tenant_id\s", columns):
        return "cityHash64(tenant_id)"
    if table in SHARDING_KEYS:
        return SHARDING_KEYS[table]
    order = _ORDER_BY.search(rest)
    if order is None:
        msg = f"table {table} has no tenant_id and no ORDER BY to shard by; add it to SHARDING_KEYS"
        raise ClusterDDLError(msg)
    key = order["key"].strip()
    return f"cityHash64{key}" if key.startswith("(") else f"cityHash64({key})"


def _split_top_level(text: str) -> list[str]:
    """ALTER commands: ``text`` split at commas outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = ""
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


def _check_identifier(name: str) -> None:
    # Names are pasted into DDL: only plain identifiers, never anything that could end a statement.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        msg = f"clickhouse cluster and database names must be plain identifiers, not {name!r}"
        raise ClusterDDLError(msg)
