"""The project's root exception and the rating domain's typed errors.

Every package derives its errors from :class:`CallmeterError` so the command line can turn any expected
failure into a one-line message and a non-zero exit, while a bug still shows a traceback.
"""


class CallmeterError(Exception):
    """Root of every error callmeter raises on purpose."""


class RatingError(CallmeterError):
    """A rating rule cannot be applied."""


class CatalogError(RatingError):
    """The pricing catalog is malformed or lacks what an event needs."""


class UnknownPlanError(CatalogError):
    """An event names a plan the catalog does not have."""


class NoSubscriptionError(RatingError):
    """No subscription covers the period an invoice or a call needs."""
