"""Settings from the environment, validated once at start-up.

Every knob has a documented default and a bound: a value outside it stops the
service with a clear message instead of misbehaving later.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from schemas import limits

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PG_PASSFILE = Path("secrets") / "pgpass"  # under the state dir


class ConfigError(ValueError):
    pass


# North, north-east and east (11–37) on s1; centre, south, south-west and north-west (41–65) on s2.
DEFAULT_SHARDS = "s1=11,12,13,14,15,21,22,23,31,32,33,34,35,36,37;s2=41,42,43,44,45,46,50,51,52,53,54,61,62,63,64,65"


def _int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is outside {lo}..{hi}")
    return value


def _str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


# A topic prefix names a test run's (or a tenant's) own topics and consumer groups, e.g. "t123.".
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,40}$")


def _topic_prefix() -> str:
    raw = os.environ.get("XS_TOPIC_PREFIX", "")
    if not _TOPIC_PREFIX.match(raw):
        raise ConfigError(f"XS_TOPIC_PREFIX={raw!r} is not up to 40 of A-Z a-z 0-9 . _ -")
    return raw


def _instance() -> str:
    raw = os.environ.get("XS_INSTANCE") or "0"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", raw):
        raise ConfigError(f"XS_INSTANCE={raw!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return raw


@dataclass(frozen=True)
class Settings:
    # Shared infrastructure (Kafka, PostgreSQL data and logs) lives in state_dir; the services'
    # supervisor, their logs and Prometheus in run_dir (a test run's own directory, else state_dir).
    state_dir: Path
    run_dir: Path
    kafka_port: int
    kafka_controller_port: int
    pg_port: int
    pg_user: str
    pg_database: str
    gateway_host: str
    gateway_port: int
    gateway_metrics_port: int
    settle_metrics_port: int
    monitor_metrics_port: int
    dashboard_port: int
    prometheus_port: int
    clearing_metrics_port: int
    gateway_timeout_ms: int
    gateway_instance: int
    request_body_bytes_max: int
    fee_items_per_upload_max: int
    batch_size_max: int
    topic_prefix: str
    partitions: int
    replication_factor: int
    # The plausible window of a request's inf_time around the broker's clock (schemas.limits).
    time_past_days: int = limits.TIME_PAST_DAYS_DEFAULT
    time_future_minutes: int = limits.TIME_FUTURE_MINUTES_DEFAULT
    # Static group membership: two processes of one service need different instances (the second
    # would fence the first).
    instance: str = "0"
    kafka_brokers: int = 1
    # Settlement state is sharded by insured province (services.common.shards): "name=prefixes;..."
    # maps every province's two-digit prefix to a shard; a shard's database is `<pg_database>_<name>`
    # on this server unless shard_dsns ("name=dsn;...") points it elsewhere.
    shards: str = DEFAULT_SHARDS
    shard_dsns: str = ""
    # Trust (README "Security"): a signed request's inf_time within ± this many seconds of the broker's
    # clock (0: off — only for replaying recorded history, as the tests' fixed dates do), and each
    # institution's person look-ups (1101) per minute.
    inf_time_window_s: int = 300
    person_queries_per_minute: int = 120
    # TLS (services.common.tls): the gateway and the dashboard serve HTTPS unless plain_http (1: a
    # development switch, warned about at start). gateway_client_certs: off | optional | required.
    plain_http: int = 0
    gateway_client_certs: str = "optional"
    # The dashboard's /metrics on a plain port of its own (its page and API need a session over TLS).
    dashboard_metrics_port: int = 9106
    smartmon_metrics_port: int = 9107
    # Dashboard sign-in sessions: idle and absolute expiry, seconds.
    dashboard_session_idle_s: int = 1800
    dashboard_session_max_s: int = 28_800
    # A consumer group with records waiting and no committed progress for this long ends its process for
    # the supervisor to restart (services/common/watchdog.py).
    watchdog_stall_s: int = 30
    # The request path's fetch (the settlement stage, clearing's 32xx requests): the broker gathers records for
    # up to this many milliseconds before it answers (0: at the first record). Fewer, larger batches cost less
    # per request in every process; a request may wait this long (services/common/kafka.py, request_fetch).
    request_gather_ms: int = 10

    @property
    def kafka_nodes(self) -> list[tuple[int, int, int]]:
        """(node id, broker port, controller port) of each local Kafka node: node 1 on XS_KAFKA_PORT /
        XS_KAFKA_CONTROLLER_PORT, node n on those + 2(n-1) (see deploy/kafka.py)."""
        return [(i + 1, self.kafka_port + 2 * i, self.kafka_controller_port + 2 * i) for i in range(self.kafka_brokers)]

    @property
    def kafka_bootstrap(self) -> str:
        # Every broker, so a client (re)starting while one is down still finds the cluster.
        return ",".join(f"127.0.0.1:{port}" for _, port, _ in self.kafka_nodes)

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://{self.pg_user}@127.0.0.1:{self.pg_port}/{self.pg_database}"

    @property
    def http_scheme(self) -> str:
        return "http" if self.plain_http else "https"

    @property
    def gateway_url(self) -> str:
        return f"{self.http_scheme}://{self.gateway_host}:{self.gateway_port}{GATEWAY_PATH}"

    @property
    def dashboard_url(self) -> str:
        return f"{self.http_scheme}://127.0.0.1:{self.dashboard_port}/"


GATEWAY_PATH = "/fsi/api/rsfComIfsService/callService"


KAFKA_BROKERS_MAX = 5


def _kafka_brokers(state_dir: Path) -> int:
    """XS_KAFKA_BROKERS, else the size of the cluster `deploy.stack start --brokers N` formatted in
    this state dir (its `kafka/brokers` file), else 1."""
    default = 1
    with contextlib.suppress(OSError, ValueError):
        default = int((state_dir / "kafka" / "brokers").read_text().strip())
    return _int("XS_KAFKA_BROKERS", min(max(default, 1), KAFKA_BROKERS_MAX), 1, KAFKA_BROKERS_MAX)


def load_settings() -> Settings:
    state_dir = Path(_str("XS_STATE_DIR", str(PROJECT_ROOT / ".state")))
    brokers = _kafka_brokers(state_dir)
    # PostgreSQL passwords: libpq (psycopg, yoyo, psql) and asyncpg read them from this file, written by
    # deploy/postgres.py; the role is XS_PG_USER (each service has its own, see deploy/services.py).
    os.environ.setdefault("PGPASSFILE", str(state_dir / PG_PASSFILE))
    return Settings(
        state_dir=state_dir,
        run_dir=Path(_str("XS_RUN_DIR", str(state_dir))),
        kafka_port=_int("XS_KAFKA_PORT", 19092, 1024, 65535),
        kafka_controller_port=_int("XS_KAFKA_CONTROLLER_PORT", 19093, 1024, 65535),
        pg_port=_int("XS_PG_PORT", 15432, 1024, 65535),
        pg_user=_str("XS_PG_USER", "xsettle"),
        pg_database=_str("XS_PG_DATABASE", "xsettle"),
        gateway_host=_str("XS_GATEWAY_HOST", "127.0.0.1"),
        gateway_port=_int("XS_GATEWAY_PORT", 8080, 1024, 65535),
        gateway_metrics_port=_int("XS_GATEWAY_METRICS_PORT", 9101, 1024, 65535),
        settle_metrics_port=_int("XS_SETTLE_METRICS_PORT", 9103, 1024, 65535),
        monitor_metrics_port=_int("XS_MONITOR_METRICS_PORT", 9104, 1024, 65535),
        dashboard_port=_int("XS_DASHBOARD_PORT", 8090, 1024, 65535),
        prometheus_port=_int("XS_PROMETHEUS_PORT", 9090, 1024, 65535),
        clearing_metrics_port=_int("XS_CLEARING_METRICS_PORT", 9105, 1024, 65535),
        gateway_timeout_ms=_int("XS_GATEWAY_TIMEOUT_MS", 5000, 50, 120_000),
        gateway_instance=_int("XS_GATEWAY_INSTANCE", 0, 0, 63),
        request_body_bytes_max=_int("XS_REQUEST_BODY_BYTES_MAX", 1_048_576, 1024, 16_777_216),
        fee_items_per_upload_max=_int("XS_FEE_ITEMS_PER_UPLOAD_MAX", 500, 1, 10_000),
        batch_size_max=_int("XS_BATCH_SIZE_MAX", 500, 1, 10_000),
        topic_prefix=_topic_prefix(),
        # Partitions bound the parallelism of each stage (used when a topic is first created).
        partitions=_int("XS_PARTITIONS", 8, 1, 256),
        # Every topic on up to 3 brokers (min.insync.replicas=2 is a multi-broker cluster's default).
        replication_factor=_int("XS_REPLICATION_FACTOR", min(brokers, 3), 1, KAFKA_BROKERS_MAX),
        time_past_days=_int("XS_TIME_PAST_DAYS", limits.TIME_PAST_DAYS_DEFAULT, 1, limits.TIME_PAST_DAYS_MAX),
        time_future_minutes=_int("XS_TIME_FUTURE_MINUTES", limits.TIME_FUTURE_MINUTES_DEFAULT, 0,
                                 limits.TIME_FUTURE_MINUTES_MAX),
        instance=_instance(),
        kafka_brokers=brokers,
        shards=_str("XS_SHARDS", DEFAULT_SHARDS),
        shard_dsns=os.environ.get("XS_SHARD_DSNS", ""),
        inf_time_window_s=_int("XS_INF_TIME_WINDOW_S", 300, 0, 86_400),
        person_queries_per_minute=_int("XS_PERSON_QUERIES_PER_MINUTE", 120, 1, 1_000_000),
        plain_http=_int("XS_PLAIN_HTTP", 0, 0, 1),
        gateway_client_certs=_choice("XS_GATEWAY_CLIENT_CERTS", "optional", ("off", "optional", "required")),
        dashboard_metrics_port=_int("XS_DASHBOARD_METRICS_PORT", 9106, 1024, 65535),
        smartmon_metrics_port=_int("XS_SMARTMON_METRICS_PORT", 9107, 1024, 65535),
        dashboard_session_idle_s=_int("XS_DASHBOARD_SESSION_IDLE_S", 1800, 1, 86_400),
        dashboard_session_max_s=_int("XS_DASHBOARD_SESSION_MAX_S", 28_800, 1, 7 * 86_400),
        watchdog_stall_s=_int("XS_WATCHDOG_STALL_S", 30, 5, 3600),
        request_gather_ms=_int("XS_REQUEST_GATHER_MS", 10, 0, 100),
    )


def settings_env(s: Settings) -> dict[str, str]:
    """The XS_* variables that make load_settings() in a child process return `s` (field x: XS_X)."""
    return {f"XS_{f.name.upper()}": str(getattr(s, f.name)) for f in fields(s)}
