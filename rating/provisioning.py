"""Which provisioning events the rules accept (spec §1): the fields each action needs and the catalog
references it makes, checked before the event touches any tenant state. Pure, like ``validate_call``."""

from __future__ import annotations

from rating.alerts import threshold_problem
from rating.catalog import Catalog
from rating.models import ProvisioningEvent, Reason, Rejection

_ACTIONS_NEEDING = {
    "SUBSCRIPTION_STARTED": ("plan_id", "tax_region"),
    "PLAN_CHANGED": ("plan_id",),
    "NUMBER_PROVISIONED": ("number", "number_type"),
    "NUMBER_RELEASED": ("number",),
    "EMPLOYEE_ACTIVATED": ("employee_id",),
    "EMPLOYEE_DEACTIVATED": ("employee_id",),
    "SUBSCRIPTION_CANCELLED": (),
    "ALERT_THRESHOLDS_SET": ("alert_thresholds_percent",),
}

# Actions that change how a tenant's calls rate (the plan of a period, the anchor, a cancellation):
# after one, the live balances are re-rated from the calls the meter remembers.
RERATING_ACTIONS = frozenset({"SUBSCRIPTION_STARTED", "PLAN_CHANGED", "SUBSCRIPTION_CANCELLED"})


def check_provisioning(event: ProvisioningEvent, catalog: Catalog) -> Rejection | None:
    """Why the event cannot be accepted (a missing field, an unknown plan or tax region, a bad
    threshold list), or None."""
    for name in _ACTIONS_NEEDING.get(event.action, ()):
        if getattr(event, name) in (None, ""):
            return Rejection(Reason.INVALID_EVENT, f"{event.action} needs {name}")
    plan_action = event.action in ("SUBSCRIPTION_STARTED", "PLAN_CHANGED")
    if plan_action and event.plan_id is not None and not catalog.has_plan(event.plan_id):
        return Rejection(Reason.UNKNOWN_PLAN, f"plan {event.plan_id!r} is not in catalog")
    if event.action == "ALERT_THRESHOLDS_SET":
        problem = threshold_problem(event.alert_thresholds_percent or ())
        if problem is not None:
            return Rejection(Reason.INVALID_EVENT, problem)
    if event.action == "SUBSCRIPTION_STARTED" and event.tax_region not in catalog.tax_regions:
        return Rejection(Reason.UNKNOWN_TAX_REGION, f"tax region {event.tax_region!r} is not in catalog")
    return None
