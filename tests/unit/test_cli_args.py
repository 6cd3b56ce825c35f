"""Argument ranges of the command line, which Kafka stack `up` starts, and the worker's port plan."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.commands.cliargs import at_least, broker_count, rate
from pipeline.commands.ports import Listener, clash, port_plan
from pipeline.commands.supervisor import SINK_ONLY, process_roles
from pipeline.errors import InputError
from pipeline.local.cluster import stack_size
from pipeline.settings import Settings

# -- argument ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (at_least(1), "1", 1),
        (at_least(0), "0", 0),
        (rate, "0", 0.0),
        (rate, "1", 1.0),
        (rate, "0.02", 0.02),
        (broker_count, "1", 1),
        (broker_count, "3", 3),
    ],
)
def test_arguments_in_range_are_taken(parse: object, text: str, value: float) -> None:
    assert parse(text) == value  # type: ignore[operator]


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (at_least(1), "0", "must be at least 1, not 0"),
        (at_least(0), "-5", "must be at least 0, not -5"),
        (at_least(1), "x", "'x' is not a whole number"),
        (rate, "2", "must be a share from 0 to 1 (0.02 = 2 %), not 2"),
        (rate, "-0.1", "must be a share from 0 to 1 (0.02 = 2 %), not -0.1"),
        (rate, "nan", "must be a share from 0 to 1 (0.02 = 2 %), not nan"),
        (rate, "lots", "'lots' is not a number"),
        (broker_count, "2", "must be 1 (one broker) or 3 (a cluster: replication 3, min ISR 2), not 2"),
        (broker_count, "0", "must be 1 (one broker) or 3 (a cluster: replication 3, min ISR 2), not 0"),
    ],
)
def test_arguments_out_of_range_are_refused_with_the_reason(parse: object, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)  # type: ignore[operator]
    assert str(err.value) == message


# -- which stack `up` starts ---------------------------------------------------------------------------

DIR = Path("/data")


@pytest.mark.parametrize(
    ("single", "cluster", "requested", "size"),
    [
        (False, None, None, 1),  # a new data dir: a single broker
        (False, None, 1, 1),
        (False, None, 3, 3),
        (True, None, None, 1),  # the single broker it has
        (True, None, 1, 1),
        (False, 3, None, 3),  # the cluster it has
        (False, 3, 3, 3),
        (True, 3, 1, 1),  # both (made before this check existed): the one asked for
        (True, 3, 3, 3),
    ],
)
def test_up_starts_the_stack_the_data_dir_has(
    single: bool, cluster: int | None, requested: int | None, size: int
) -> None:
    assert stack_size(single, cluster, requested, DIR) == size


@pytest.mark.parametrize(
    ("single", "cluster", "requested", "says"),
    [
        (True, None, 3, "/data holds a single broker (/data/kafka); a 3-broker cluster would start empty"),
        (
            False,
            3,
            1,
            "/data holds a 3-broker cluster (/data/kafka-cluster); a single broker would start empty",
        ),
        (False, 2, 3, "/data holds a 2-broker cluster (/data/kafka-cluster); a 3-broker cluster would start"),
        (True, 3, None, "/data holds two Kafka stacks, a single broker (/data/kafka) and a 3-broker cluster"),
    ],
)
def test_up_refuses_a_second_stack_beside_the_first(
    single: bool, cluster: int | None, requested: int | None, says: str
) -> None:
    with pytest.raises(InputError) as err:
        stack_size(single, cluster, requested, DIR)
    assert str(err.value).startswith(says)


# -- the worker's ports --------------------------------------------------------------------------------


def _settings(**kwargs: object) -> Settings:
    return Settings(worker_web_port=6066, partitions=6, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("processes", "sink", "ports"),
    [
        (1, True, [6066]),  # one process does it all
        (2, True, [6066, 6067, 6068]),  # stream 0, stream 1, the sink at base + N
        (3, False, [6066, 6067, 6068]),  # a `sink` service elsewhere writes the ledger
        (8, True, [6066, 6067, 6068, 6069, 6070, 6071, 6072]),  # at most the 6 partitions + the sink
    ],
)
def test_the_port_layout(processes: int, sink: bool, ports: list[int]) -> None:
    settings = _settings(worker_processes=processes, worker_ledger_sink=sink)
    assert [listener.port for listener in port_plan(settings, process_roles(settings))] == ports


def test_the_sink_service_uses_the_base_port_and_names_itself() -> None:
    plan = port_plan(_settings(api_port=7000), SINK_ONLY, with_api=False)
    assert plan == [Listener(6066, "the ledger sink's metrics port (CALLMETER_WORKER_WEB_PORT)")]


def test_a_tenant_api_port_among_the_workers_is_named() -> None:
    settings = _settings(worker_processes=2, api_port=6068)
    assert clash(port_plan(settings, process_roles(settings))) == (
        "port 6068 is both the ledger sink's metrics port (CALLMETER_WORKER_WEB_PORT + 2) and the tenant API "
        "(CALLMETER_API_PORT): this run's processes use 6066..6068; give the tenant API "
        "(CALLMETER_API_PORT) a port outside that range"
    )


def test_ports_that_fit_have_no_clash() -> None:
    settings = _settings(worker_processes=2, api_port=6069)
    assert clash(port_plan(settings, process_roles(settings))) is None


def test_a_derived_port_past_65535_is_named() -> None:
    settings = Settings(worker_web_port=65535, partitions=6, worker_processes=2)
    assert clash(port_plan(settings, process_roles(settings))) == (
        "port 65536, the web port of stream worker process 1 (CALLMETER_WORKER_WEB_PORT + 1), is not a TCP "
        "port (1..65535); choose a lower base port"
    )
