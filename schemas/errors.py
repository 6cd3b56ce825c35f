"""Typed errors of the Avro serde."""

from typing import Final

from rating.errors import CallmeterError

# Dead-letter reason codes a SerdeError carries. Constants rather than literals at raise sites: ruff's EM
# rules reject string literals in exception constructors, and a typo here would be a silent new code.
UNDECODABLE: Final = "UNDECODABLE"
UNKNOWN_SCHEMA: Final = "UNKNOWN_SCHEMA"
INVALID_EVENT: Final = "INVALID_EVENT"


class SerdeError(CallmeterError):
    """Bytes could not be decoded, or a record could not be encoded.

    ``reason`` is the dead-letter reason code (UNDECODABLE, UNKNOWN_SCHEMA, INVALID_EVENT).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RegistryError(CallmeterError):
    """The schema registry could not be reached or refused a request.

    Deliberately not a :class:`SerdeError`: an outage says nothing about the record, so the record must
    not be dead-lettered; the caller should retry or stop.
    """
