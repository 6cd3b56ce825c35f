"""Faust (and aiokafka) where they have no seam: two attributes replaced, and every override checked.

Everything else callmeter changes in Faust is a subclass reached through Faust's own seams
(stream/faust_seams.py). Two behaviours have none:

1. **Faust's recovery module's ``asyncio``** is ``recovery.poll`` (stream/recovery.py part 2): the wait
   on the changelog queue sits in the middle of Faust's ``Recovery._slurp_changelogs`` loop, a 200-line
   service task with no hook, and its timeout is what runs the position heuristic that lost records
   on a busy machine.
2. **aiokafka's ``GroupCoordinator._on_join_complete``** starts the heartbeat task first (below). Faust
   does not create the group coordinator; aiokafka's consumer does, by name.

``install()`` runs once per worker process, before the Faust app is built (stream/app.py
``build_app``). It first checks that every Faust and aiokafka method overridden here or in
faust_seams.py still exists with the parameters the override expects, and stops with a
``FaustExtensionError`` naming each one that does not: an upgrade of the pinned faust-streaming must
fail loudly at start-up rather than silently drop a guarantee.

Why the heartbeat moves (2):
The worker stays a member of its consumer group while it takes on an assignment, however busy the host.

aiokafka stops its heartbeats when the group rebalances and starts them again only after the
application's "partitions assigned" callback has returned. Faust does all of its assignment work in
that callback: it starts a transactional producer per assigned input partition (and fencing.py closes
what earlier owners left open), then opens the RocksDB database of every table partition. On a quiet
machine that takes a second or two; with the load average at 4-8x the cores it took 10-25 s. The
worker's session timeout is 10 s (so a killed worker's partitions move on quickly, see
stream/worker.py), so the broker dropped the member in the middle of its own assignment ("Heartbeat
failed: local member_id was not recognized; resetting and re-joining group"), the group rebalanced
again, the next assignment was just as slow, and so on: rebalance storms on a fresh start, recovery
rounds interrupted again and again, a 124 s stall ended by the stall watchdog (make chaos-busy).

The Java consumer heartbeats from a thread of its own through its rebalance callbacks, bounded by
the rebalance timeout instead; this does the same for aiokafka: the heartbeat task starts as soon as
the member has joined and synced its generation, before the callback. A heartbeat that meets a new
rebalance meanwhile only asks for a rejoin, which aiokafka performs after the callback, as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import faust
import faust.stores.rocksdb as faust_rocksdb
import faust.tables.base as faust_tables_base
import faust.tables.manager as faust_manager
import faust.tables.recovery as faust_recovery
import faust.transport.consumer as faust_consumer
import faust.transport.drivers.aiokafka as faust_aiokafka
from aiokafka.consumer.group_coordinator import GroupCoordinator

from pipeline.errors import PipelineError
from pipeline.stream import recovery


class FaustExtensionError(PipelineError):
    """The installed Faust or aiokafka no longer has a method callmeter extends, as it expects it."""


# (class, attribute, parameter names the override passes on; None: an attribute that is not called)
EXTENDED: tuple[tuple[object, str, tuple[str, ...] | None], ...] = (
    (faust.App, "_new_transport", ("self",)),
    (faust.App, "_new_producer_transport", ("self",)),
    (faust_aiokafka.Transport, "Consumer", None),
    (faust_aiokafka.Transport, "Producer", None),
    (faust_aiokafka.Transport, "TransactionManager", None),
    (faust_consumer.Consumer, "force_commit", ("self", "topics", "start_new_transaction")),
    (faust_consumer.Consumer, "on_partitions_revoked", ("self", "revoked")),
    (faust_consumer.Consumer, "getmany", ("self", "timeout")),
    (faust_consumer.Consumer, "perform_seek", ("self",)),
    (faust_consumer.Consumer, "resume_flow", ("self",)),
    (faust_consumer.ThreadDelegateConsumer, "seek_wait", ("self", "partitions")),
    (faust_consumer.ThreadDelegateConsumer, "earliest_offsets", ("self", "partitions")),
    (faust_consumer.Consumer, "_filter_tps_with_pending_acks", ("self", "topics")),
    (faust_aiokafka.Producer, "_settings_extra", ("self",)),
    (faust_consumer.TransactionManager, "_start_transactions", ("self", "tids")),
    (faust.Topic, "_on_published", ("self", "fut", "message", "producer", "state")),
    (faust_manager.TableManager, "recovery", None),
    (
        faust_manager.TableManager,
        "on_rebalance",
        ("self", "assigned", "revoked", "newly_assigned", "generation_id"),
    ),
    (faust_recovery.Recovery, "_build_highwaters", ("self", "consumer", "tps", "destination", "title")),
    (faust_recovery.Recovery, "_highwater_logtable", ("self", "highwaters", "title")),
    (faust_recovery.Recovery, "signal_recovery_end", None),
    (faust_recovery.Recovery, "_set_recovery_started", ("self",)),
    (faust_recovery.Recovery, "on_recovery_completed", ("self", "generation_id")),
    (faust_recovery, "asyncio", None),
    (faust_tables_base.Collection, "_new_store_by_url", ("self", "url")),
    (faust_rocksdb.Store, "apply_changelog_batch", ("self", "batch", "to_key", "to_value")),
    (faust_rocksdb.Store, "persisted_offset", ("self", "tp")),
    (
        GroupCoordinator,
        "_on_join_complete",
        ("self", "generation", "member_id", "protocol", "member_assignment_bytes"),
    ),
    (GroupCoordinator, "_start_heartbeat_task", ("self",)),
)


def check(extended: Iterable[tuple[object, str, tuple[str, ...] | None]] = EXTENDED) -> list[str]:
    """What no longer matches: one line per method or attribute (empty when all is as expected)."""
    problems = []
    for owner, name, params in extended:
        where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', '')}.{name}".lstrip(".")
        try:
            attr = inspect.getattr_static(owner, name)
        except AttributeError:
            problems.append(f"{where} is gone")
            continue
        if params is None:
            continue
        func = getattr(attr, "__func__", attr)
        try:
            found = tuple(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            problems.append(f"{where} is not a function any more")
            continue
        if found != params:
            problems.append(f"{where} takes ({', '.join(found)}), expected ({', '.join(params)})")
    return problems


_original_on_join_complete = GroupCoordinator._on_join_complete
_installed = False


async def _on_join_complete_heartbeating(
    self: Any, generation: int, member_id: str, protocol: str, member_assignment_bytes: bytes
) -> None:
    self._start_heartbeat_task()  # a no-op when it runs already; aiokafka's own start after this too
    await _original_on_join_complete(self, generation, member_id, protocol, member_assignment_bytes)


def install() -> None:
    """Check every extension point, then replace the two attributes (once per process)."""
    global _installed
    if _installed:
        return
    problems = check(EXTENDED)
    if problems:
        msg = f"faust-streaming {faust.__version__} is not the version callmeter extends: " + "; ".join(
            problems
        )
        raise FaustExtensionError(msg)
    faust_recovery.asyncio = recovery.poll  # type: ignore[assignment]
    GroupCoordinator._on_join_complete = _on_join_complete_heartbeating  # type: ignore[method-assign]
    _installed = True
