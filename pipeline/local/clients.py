"""What a command connects with: the Avro serde (schema registry from the settings) and the Kafka
bootstrap servers (topics ensured). Apart from cli.py so the modules cli.py runs (demo, replay,
bench) can use them without importing the command line back."""

from __future__ import annotations

from typing import Any

from pipeline.settings import Settings


def make_serde(settings: Settings) -> Any:
    from schemas.serde import Serde

    auth = (
        settings.schema_registry_basic_auth.get_secret_value()
        if settings.schema_registry_basic_auth
        else None
    )
    return Serde(settings.schema_registry_url, auth)


def kafka(settings: Settings, create_topics: bool = True) -> str:
    from pipeline.local.cluster import bootstrap_servers
    from pipeline.topics import ensure_topics

    bootstrap = bootstrap_servers(settings)
    if create_topics:
        ensure_topics(settings, bootstrap)
    return bootstrap
