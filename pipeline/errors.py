"""Typed errors of the pipeline package (broker, worker, command line)."""

from rating.errors import CallmeterError


class PipelineError(CallmeterError):
    """The pipeline cannot do what was asked."""


class BrokerError(PipelineError):
    """The Kafka broker cannot be fetched, started, reached or configured."""


class InputError(PipelineError):
    """A file or flag given on the command line is unusable."""
