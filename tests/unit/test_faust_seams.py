"""Faust is extended through its seams (stream/faust_seams.py), and patched only where it has none, in one
module that checks every extension point at start-up (stream/faust_patches.py)."""

from __future__ import annotations

import re
from pathlib import Path

import faust.tables.recovery as faust_recovery
import faust.transport.consumer as faust_consumer
import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator

from pipeline.settings import Settings
from pipeline.stream import faust_patches, faust_seams, recovery
from pipeline.stream.app import build_app

ROOT = Path(__file__).resolve().parents[2]
# An assignment onto an attribute of an imported Faust or aiokafka module or class.
_ASSIGNS_ONTO_LIBRARY = re.compile(
    r"^\s*(faust\w*|aiokafka\w*|GroupCoordinator)(\.\w+)+\s*=[^=]", re.MULTILINE
)


def test_the_installed_faust_has_every_method_callmeter_extends() -> None:
    assert faust_patches.check() == []


class _Changed:
    def force_commit(self, topics: object) -> bool:  # start_new_transaction dropped by an "upgrade"
        return True


@pytest.mark.parametrize(
    ("extended", "problem"),
    [
        ([(_Changed, "force_commit", ("self", "topics", "start_new_transaction"))], "takes (self, topics)"),
        ([(_Changed, "on_partitions_revoked", ("self", "revoked"))], "on_partitions_revoked is gone"),
        ([(_Changed, "force_commit", None)], None),
    ],
)
def test_a_changed_or_missing_extension_point_is_named(
    extended: list[tuple[object, str, tuple[str, ...] | None]], problem: str | None
) -> None:
    problems = faust_patches.check(extended)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]
        assert "_Changed" in problems[0]


def test_install_refuses_a_faust_that_does_not_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust_patches, "_installed", False)
    monkeypatch.setattr(faust_patches, "EXTENDED", ((_Changed, "gone", ("self",)),))
    with pytest.raises(faust_patches.FaustExtensionError, match=r"_Changed\.gone is gone"):
        faust_patches.install()


def test_the_app_is_built_from_the_seams(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    app = build_app(settings, "localhost:1")
    assert isinstance(app, faust_seams.MeterApp)
    assert app.bootstrap == "localhost:1"
    transport = app.transport
    assert transport.Consumer is faust_seams.MeterConsumer
    assert transport.Producer is faust_seams.MeterProducer
    assert transport.TransactionManager is faust_seams.MeterTransactionManager
    assert app.conf.Topic is faust_seams.MeterTopic
    assert isinstance(app.tables, faust_seams.MeterTableManager)
    assert isinstance(app.tables.recovery, faust_seams.MeterRecovery)
    table = app.Table("seen", partitions=1, key_type=str)
    assert isinstance(table, faust_seams.MeterTable)
    assert isinstance(table.changelog_topic, faust_seams.MeterTopic)


def test_faust_classes_keep_their_own_methods_and_only_the_two_unseamed_attributes_change() -> None:
    faust_patches.install()
    assert faust_consumer.Consumer.force_commit.__module__ == "faust.transport.consumer"
    assert faust_consumer.TransactionManager._start_transactions.__module__ == "faust.transport.consumer"
    assert faust_recovery.Recovery._build_highwaters.__module__ == "faust.tables.recovery"
    assert faust_recovery.asyncio is recovery.poll
    assert GroupCoordinator._on_join_complete.__module__ == "pipeline.stream.faust_patches"


def test_no_module_but_faust_patches_assigns_onto_faust_or_aiokafka() -> None:
    offenders = []
    sources = [path for package in ("pipeline", "sinks", "bench") for path in ROOT.glob(f"{package}/**/*.py")]
    for path in sorted(sources):
        if path.name == "faust_patches.py":
            continue
        for match in _ASSIGNS_ONTO_LIBRARY.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert offenders == []
    assert _ASSIGNS_ONTO_LIBRARY.search("    faust_recovery.asyncio = poll\n")
    assert not _ASSIGNS_ONTO_LIBRARY.search("    faust_recovery.asyncio == poll\n")
