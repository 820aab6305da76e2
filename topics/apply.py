"""Apply the topic catalog to the broker: create what is missing, align configs.

Idempotent. Never shrinks or grows partitions of an existing topic silently:
changing a keyed topic's partition count moves persons between partitions and
would break per-person ordering for records in flight, so it is reported.

    python -m topics.apply [--bootstrap 127.0.0.1:19092]   # the topics of Settings (XS_TOPIC_PREFIX ...)
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.common.config import load_settings
from topics.catalog import ALL_TOPICS, TopicSpec, catalog


async def apply_topics(bootstrap: str, specs: tuple[TopicSpec, ...] = ALL_TOPICS) -> list[str]:
    """Returns a list of problems (empty when the broker matches the catalog)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    problems: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs)
                    for s in missing
                ],
                timeout_ms=15_000,
            )
            for s in missing:
                print(f"created topic {s.name} ({s.partitions} partitions)")
        present = [s for s in specs if s.name in existing]
        if present:
            described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in present])}
            for s in present:
                count = len(described[s.name]["partitions"])
                if count != s.partitions:
                    problems.append(f"{s.name} has {count} partitions, the catalog says {s.partitions}")
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, s.name, configs=s.configs) for s in present]
            )
            print(f"{len(present)} topics already present; configs aligned")
    finally:
        await admin.close()
    return problems


def main() -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=settings.kafka_bootstrap)
    args = parser.parse_args()
    problems = asyncio.run(apply_topics(args.bootstrap, catalog(settings)))
    for p in problems:
        print(f"WARNING: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
