"""Which input partition holds a tenant: the Java client's murmur2 of the tenant id's bytes, as gateways
and `callmeter produce` partition (``partitioner=murmur2_random``) and as Faust's producer computes it.
The worker finds a tenant's state by it, and so does the tenant API's view of the changelogs."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(tenant_id: str, partitions: int) -> int:
    return int((murmur2(tenant_id.encode()) & 0x7FFFFFFF) % partitions)
