"""The worker stays a member of its consumer group while it takes on an assignment, however busy the host.

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

Fault injection (crash point ``assign-slow``): in the first process, Faust's work on every assignment
takes 12 s longer, more than the session timeout, as on a loaded machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust.tables.manager as faust_tables
from aiokafka.consumer.group_coordinator import GroupCoordinator

from pipeline.crashpoints import CRASH_AT

_original_on_join_complete = GroupCoordinator._on_join_complete


async def _on_join_complete_heartbeating(
    self: Any, generation: int, member_id: str, protocol: str, member_assignment_bytes: bytes
) -> None:
    self._start_heartbeat_task()  # a no-op when it runs already; aiokafka's own start after this too
    await _original_on_join_complete(self, generation, member_id, protocol, member_assignment_bytes)


SLOW_ASSIGNMENT_SECONDS = 12.0
_original_on_rebalance = faust_tables.TableManager.on_rebalance


async def _slow_on_rebalance(self: Any, *args: Any, **kwargs: Any) -> None:
    await asyncio.sleep(SLOW_ASSIGNMENT_SECONDS)
    await _original_on_rebalance(self, *args, **kwargs)


def install() -> None:
    """Patch aiokafka's group coordinator for this process (the stream worker's)."""
    GroupCoordinator._on_join_complete = _on_join_complete_heartbeating  # type: ignore[method-assign]
    if CRASH_AT.startswith("assign-slow"):
        faust_tables.TableManager.on_rebalance = _slow_on_rebalance  # type: ignore[method-assign]
