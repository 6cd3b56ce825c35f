"""The commit guard hands every buffered table write to its producer before a commit (stream/guard.py
``_drain_table_writes``), including a write Faust's buffer task has taken but not yet sent: such a write
landed in the *next* transaction, and a worker stopping after the commit lost it (the last balance
changes of a run were missing after a rebuild from the changelogs)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.transport.producer import ProducerBuffer

from pipeline.stream.guard import _drain_table_writes


def test_a_write_taken_from_the_buffer_but_not_yet_sent_is_waited_for() -> None:
    async def run() -> list[str]:
        handed: list[str] = []
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]

        async def send_pending(fut: Any) -> None:
            await asyncio.sleep(0.05)  # on its way to the producer (serialising, the transaction manager)
            handed.append(fut)

        buffer._send_pending = send_pending  # type: ignore[method-assign]
        await buffer.start()
        try:
            for name in ("a", "b", "c"):
                buffer.put(name)  # type: ignore[arg-type]
            await asyncio.sleep(0.01)  # the buffer task has taken "a" and is sending it
            await _drain_table_writes(SimpleNamespace(producer=SimpleNamespace(buffer=buffer)))
            return list(handed)
        finally:
            await buffer.stop()

    assert asyncio.run(run()) == ["a", "b", "c"]
