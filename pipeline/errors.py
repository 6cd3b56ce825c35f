"""Typed errors of the pipeline package (broker, worker, command line)."""

from rating.errors import CallmeterError


class PipelineError(CallmeterError):
    """The pipeline cannot do what was asked."""


class BrokerError(PipelineError):
    """The Kafka broker cannot be fetched, started, reached or configured."""


class InputError(PipelineError):
    """A file or flag given on the command line is unusable."""


class UsageError(InputError):
    """A flag or setting contradicts another, or is out of range: exit 2, like a bad flag."""


class RetryableError(PipelineError):
    """The worker stopped on a fault a fresh process recovers from (ledger refused a batch, Faust
    stopped on an error, a stall); `callmeter worker` restarts it (pipeline/commands/supervisor.py)."""
