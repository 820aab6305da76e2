"""Kafka for the local stack: the single KRaft broker (default), and a local multi-broker KRaft cluster
(the option `python -m deploy.stack start --brokers 3`).

Single broker: node id 1 on XS_KAFKA_PORT / XS_KAFKA_CONTROLLER_PORT, files in .state/kafka/
(server.properties, data/, cluster-id), log .state/logs/kafka.log. Every broker is a program of the
state dir's supervisord (deploy/supervisor.py, infra=True) without autorestart: a killed broker stays
down until start_kafka / start_node starts it again.

Cluster: three JVMs on 127.0.0.1, each a combined broker + controller with its own node id, ports and log
dir: node n listens on XS_KAFKA_PORT + 2(n-1) (clients) and XS_KAFKA_CONTROLLER_PORT + 2(n-1)
(controller quorum). The quorum is static (`controller.quorum.voters`), so formatting needs no
directory ids and a node restarted after `kill -9` simply rejoins. Topics get replication factor
3 with `min.insync.replicas=2` (the internal offsets and transaction topics likewise): with
producers at acks=all and idempotent, an acknowledged record is on two disks, and one broker may
die — the active controller or a partition leader — without losing or blocking anything.

Files under .state/kafka/: `brokers` (the cluster size; Settings reads it so every client
bootstraps from all nodes), `cluster<N>/cluster-id`, `cluster<N>/node-<n>/{data,server.properties}`;
logs in .state/logs/kafka-<n>.log.

Security (README "Security"): clients authenticate with SASL/SCRAM-SHA-512 on the client listener
(`CLIENT`, also the inter-broker listener: brokers replicate as the SCRAM user `broker`); the controller
listener (quorum, broker-to-controller) uses SASL/PLAIN with one static user `controller` from the
properties file — SCRAM credentials live in the metadata log, which the controllers must reach first.
The StandardAuthorizer denies what no ACL allows; `admin`, `broker` and `controller` are super users.
Passwords come from `<state_dir>/secrets/` (generated at first start), so the generated properties files
are written 0600. SCRAM users are created through the admin API: the first start of a state dir's
broker or cluster (fresh, or formatted before security existed) runs it once without security, adds
`admin` and `broker`, stops it and records that in `scram.stamp`; every start after that is secured.

Functions for deploy.stack, the chaos command and tests: start_kafka, stop_kafka, kafka_pid,
kafka_metadata; start_cluster, stop_cluster, node_pid, kill_node, start_node, quorum_leader.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.common import DEPLOY_DIR, Paths, StackError, _port_open, _run_async, say, tail, warn
from deploy.services import infra_program
from deploy.supervisor import LIVE_STATES, Supervisor
from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, SCRAM_MECHANISM, client_auth
from services.common.secrets import password, secrets_dir, write_atomically

LOG4J_CONFIG = DEPLOY_DIR / "kafka" / "log4j2.yaml"
KAFKA_NODE_ID = 1
KAFKA_MAIN = "kafka.Kafka"
KAFKA_READY_TIMEOUT_S = 60.0
KAFKA_STOP_TIMEOUT_S = 30.0

MIN_INSYNC_REPLICAS = 2
CLUSTER_READY_TIMEOUT_S = 90.0
NODE_HEAP = "-Xmx512M"  # three JVMs share a small machine with everything else
QUORUM_MAIN = "org.apache.kafka.tools.MetadataQuorumCommand"
TOOLS_LOG4J_CONFIG = Path(__file__).resolve().parent / "kafka" / "tools-log4j2.properties"


# --- security ------------------------------------------------------------------------------

BROKER_USER = "broker"  # inter-broker replication (SCRAM, client listener)
CONTROLLER_USER = "controller"  # quorum and broker-to-controller traffic (PLAIN, controller listener)
SUPER_USERS = (ADMIN, BROKER_USER, CONTROLLER_USER)
SECURED_STAMP = "scram.stamp"
SECURED_VERSION = "scram-sha-512 v1"


def _jaas(module: str, user: str, secret: str, *, serves: bool = False) -> str:
    own = f' user_{user}="{secret}"' if serves else ""
    return f'org.apache.kafka.common.security.{module} required username="{user}" password="{secret}"{own};'


def _listener_lines(s: Settings, port: int, ctrl: int, secured: bool) -> list[str]:
    if not secured:  # the former configuration: only for the one start that adds the first users
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    controller_pw = password(s, f"kafka-{CONTROLLER_USER}")
    return [
        f"listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
        f"advertised.listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=CLIENT",
        "listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT",
        f"listener.name.client.sasl.enabled.mechanisms={SCRAM_MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
        "listener.name.client.scram-sha-512.sasl.jaas.config="
        + _jaas("scram.ScramLoginModule", BROKER_USER, password(s, f"kafka-{BROKER_USER}")),
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.controller.protocol=PLAIN",
        "listener.name.controller.plain.sasl.jaas.config="
        + _jaas("plain.PlainLoginModule", CONTROLLER_USER, controller_pw, serves=True),
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        "super.users=" + ";".join(f"User:{u}" for u in SUPER_USERS),
    ]


def client_config(s: Settings, principal: str) -> Path:
    """A Java client's properties (`--command-config`) authenticating as `principal`, under secrets/."""
    path = secrets_dir(s) / f"kafka-{principal}.client.properties"
    secret = password(s, f"kafka-{principal}")
    if principal == CONTROLLER_USER:
        lines = ["security.protocol=SASL_PLAINTEXT", "sasl.mechanism=PLAIN",
                 "sasl.jaas.config=" + _jaas("plain.PlainLoginModule", principal, secret)]
    else:
        lines = ["security.protocol=SASL_PLAINTEXT", f"sasl.mechanism={SCRAM_MECHANISM}",
                 "sasl.jaas.config=" + _jaas("scram.ScramLoginModule", principal, secret)]
    write_atomically(path, "\n".join([*lines, ""]))
    return path


def admin_auth(s: Settings) -> dict[str, object]:
    return client_auth(s, ADMIN)


def _secured(stamp_dir: Path) -> bool:
    stamp = stamp_dir / SECURED_STAMP
    return stamp.exists() and stamp.read_text().strip() == SECURED_VERSION


def _add_first_users(s: Settings, bootstrap: str) -> None:
    """Through the admin API of a broker still without security: `admin` and `broker` (the services'
    users follow in topics.apply, as admin)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from topics.security import set_passwords

    async def add() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        await admin.start()
        try:
            await set_passwords(admin, {u: password(s, f"kafka-{u}") for u in (ADMIN, BROKER_USER)})
        finally:
            await admin.close()

    _run_async(add())


# --- the single broker ---------------------------------------------------------------------


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("java not found: run deploy/bootstrap.sh")
    return found


def _kafka_classpath(p: Paths) -> str:
    if not p.kafka_lib.is_dir() or not any(p.kafka_lib.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {p.kafka_lib}: run deploy/bootstrap.sh")
    return f"{p.kafka_lib}/*"


def _infra(s: Settings) -> Supervisor:
    return Supervisor(s, infra=True)


def kafka_pid(s: Settings | None = None) -> int | None:
    """The single broker's pid while the state dir's supervisord runs it."""
    return _infra(s or load_settings()).pid("kafka")


def _broker_pids(s: Settings) -> set[int]:
    """Pids of the Kafka programs (single broker, cluster nodes) that supervisord runs."""
    sup = _infra(s)
    if not sup.running():
        return set()
    return {int(i["pid"]) for i in sup.rpc().getAllProcessInfo()
            if i["name"].startswith("kafka") and i["statename"] in LIVE_STATES and i["pid"]}


def _broker_command(p: Paths, props: Path, heap: Sequence[str]) -> list[str]:
    return [
        _java(),
        *heap,
        "-server",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:MaxInlineLevel=15",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        _kafka_classpath(p),
        KAFKA_MAIN,
        str(props),
    ]


def kafka_programs(s: Settings) -> list[str]:
    """The infrastructure supervisord's Kafka programs: `kafka` (the single broker) and `kafka-<n>`, the
    nodes of the cluster of `s` (of a three-broker cluster when `s` has one broker). SIGTERM is a clean
    shutdown; a broker still running 30 s later gets SIGKILL."""
    p = Paths.of(s)
    cluster = s if s.kafka_brokers > 1 else dataclasses.replace(s, kafka_brokers=3)
    programs = [infra_program("kafka", _broker_command(p, p.kafka_props, ["-Xmx1G", "-Xms1G"]), p.kafka,
                              p.log("kafka"), stop_wait_secs=int(KAFKA_STOP_TIMEOUT_S))]
    for node in nodes(cluster):
        programs.append(infra_program(node.name, _broker_command(p, node.props, [NODE_HEAP, "-Xms256M"]),
                                      p.kafka, p.log(node.name), stop_wait_secs=int(KAFKA_STOP_TIMEOUT_S)))
    return programs


def kafka_properties(s: Settings, p: Paths, secured: bool = True) -> str:
    port, ctrl = s.kafka_port, s.kafka_controller_port
    return "\n".join(
        [
            "# Generated by deploy/kafka.py on every start; edit there, not here.",
            "process.roles=broker,controller",
            f"node.id={KAFKA_NODE_ID}",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{ctrl}",
            *_listener_lines(s, port, ctrl, secured),
            f"log.dirs={p.kafka_data}",
            "num.partitions=1",
            # Topics come from topics/apply.py only: a client asking for a deleted topic (e.g. a finished
            # test run's) must not bring it back, and a misspelt name must fail instead of appearing.
            "auto.create.topics.enable=false",
            # single node: every internal topic with replication factor 1
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=16",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=16",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.hours=168",
            "",
        ]
    )


def _java_tool(p: Paths, main: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        _java(),
        "-Xmx512M",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        _kafka_classpath(p),
        main,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def _kafka_format(s: Settings, p: Paths) -> None:
    stamp = f"node={KAFKA_NODE_ID} port={s.kafka_port} controller={s.kafka_controller_port}"
    meta = p.kafka_data / "meta.properties"
    if meta.exists():
        old = p.kafka_format_stamp.read_text().strip() if p.kafka_format_stamp.exists() else stamp
        if old == stamp:
            return
        # The standalone controller's endpoint is recorded in the metadata log at format time.
        warn(f"Kafka ports changed ({old} -> {stamp}): wiping {p.kafka_data} and formatting anew")
        shutil.rmtree(p.kafka_data)
        (p.kafka / SECURED_STAMP).unlink(missing_ok=True)
    if p.kafka_cluster_id.exists():
        cluster_id = p.kafka_cluster_id.read_text().strip()
    else:
        res = _java_tool(p, "kafka.tools.StorageTool", "random-uuid")
        if res.returncode != 0:
            raise StackError(f"kafka StorageTool random-uuid failed:\n{res.stdout}{res.stderr}")
        cluster_id = res.stdout.strip().splitlines()[-1].strip()
        p.kafka_cluster_id.write_text(cluster_id + "\n")
    say(f"formatting Kafka storage {p.kafka_data} (cluster id {cluster_id})")
    res = _java_tool(
        p,
        "kafka.tools.StorageTool",
        "format",
        "--standalone",
        "-t",
        cluster_id,
        "-c",
        str(p.kafka_props),
        "--ignore-formatted",
    )
    if res.returncode != 0:
        raise StackError(f"kafka StorageTool format failed:\n{res.stdout}{res.stderr}")
    p.kafka_format_stamp.write_text(stamp + "\n")


def _kafka_secure_once(s: Settings, p: Paths) -> None:
    """The first start of this broker since it is secured: add the first users without security."""
    say("kafka: adding the SCRAM users admin and broker (one start without security)")
    write_atomically(p.kafka_props, kafka_properties(s, p, secured=False))
    pid = _infra(s).start("kafka")
    try:
        _kafka_wait_ready(s, p, pid, auth={})
        _add_first_users(s, s.kafka_bootstrap)
    finally:
        _infra(s).stop("kafka")
    (p.kafka / SECURED_STAMP).write_text(SECURED_VERSION + "\n")


def _kafka_launch(s: Settings, p: Paths) -> int:
    write_atomically(p.kafka_props, kafka_properties(s, p))
    _kafka_format(s, p)
    if not _secured(p.kafka):
        _kafka_secure_once(s, p)
        write_atomically(p.kafka_props, kafka_properties(s, p))
    pid = _infra(s).start("kafka")
    say(f"kafka: started pid {pid} on 127.0.0.1:{s.kafka_port} (controller {s.kafka_controller_port})")
    return pid


async def kafka_metadata(bootstrap: str, timeout_ms: int = 5000, auth: dict[str, object] | None = None) -> int:
    """One real metadata request (authenticated with `auth`, client_auth's options); returns the
    number of brokers it reports."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, **(auth or {}))
    try:
        await client.bootstrap()
        metadata = await client.fetch_all_metadata()
        return len(metadata.brokers())
    finally:
        await client.close()


def _kafka_probe(s: Settings, auth: dict[str, object] | None = None) -> bool:
    """A metadata request answered (as admin unless `auth` says otherwise)."""
    if not _port_open(s.kafka_port):
        return False
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return _run_async(kafka_metadata(s.kafka_bootstrap, auth=admin_auth(s) if auth is None else auth)) >= 1
    except Exception:
        return False
    finally:
        quiet.setLevel(level)


def _kafka_wait_ready(s: Settings, p: Paths, pid: int | None, timeout: float = KAFKA_READY_TIMEOUT_S,
                      auth: dict[str, object] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if pid is not None and pid not in _broker_pids(s):
            raise StackError(
                f"kafka (pid {pid}) exited during start-up; last lines of {p.log('kafka')}:\n" + tail(p.log("kafka"))
            )
        if _kafka_probe(s, auth):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"kafka did not answer a metadata request on {s.kafka_bootstrap} within {timeout:.0f}s; "
                f"last lines of {p.log('kafka')}:\n" + tail(p.log("kafka"))
            )
        time.sleep(0.25)


def start_kafka(s: Settings | None = None, wait: bool = True) -> int | None:
    """Start Kafka unless it runs already; returns its pid (None: an instance we did not start).
    With a multi-broker cluster (--brokers N, deploy/kafka.py) it starts every node and waits."""
    s = s or load_settings()
    p = Paths.of(s)
    p.ensure()
    if s.kafka_brokers > 1:
        return start_cluster(s)[0]
    stop_any_cluster(s)  # a cluster left from --brokers N holds node 1's ports
    pid = kafka_pid(s)
    if pid is not None and not _secured(p.kafka):
        say("kafka: running without security: restarting it secured")
        _infra(s).stop("kafka")
        pid = None
    if pid is not None:
        say(f"kafka: already running (pid {pid})")
    elif _port_open(s.kafka_port) or _port_open(s.kafka_controller_port):
        if _kafka_probe(s):
            warn(f"kafka: port {s.kafka_port} answers but was not started from {p.state}; reusing it")
            return None
        raise StackError(
            f"kafka: port {s.kafka_port} or {s.kafka_controller_port} is taken by something that is not "
            "this stack's Kafka (set XS_KAFKA_PORT / XS_KAFKA_CONTROLLER_PORT)"
        )
    else:
        pid = _kafka_launch(s, p)
    if wait:
        _kafka_wait_ready(s, p, pid)
        say(f"kafka: ready on {s.kafka_bootstrap}")
    return pid


def stop_kafka(s: Settings | None = None, timeout: float = KAFKA_STOP_TIMEOUT_S) -> bool:
    """Stop the single broker and any cluster node of this state dir; SIGKILL after `timeout` is
    supervisord's stopwaitsecs (KAFKA_STOP_TIMEOUT_S). Returns whether the single broker ran."""
    s = s or load_settings()
    stop_any_cluster(s)
    return _infra(s).stop("kafka")


# --- a multi-broker cluster ----------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    node_id: int
    port: int
    controller_port: int
    dir: Path

    @property
    def name(self) -> str:
        return f"kafka-{self.node_id}"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def props(self) -> Path:
        return self.dir / "server.properties"


def cluster_dir(s: Settings) -> Path:
    return Paths.of(s).kafka / f"cluster{s.kafka_brokers}"


def nodes(s: Settings) -> list[Node]:
    base = cluster_dir(s)
    return [Node(n, port, ctrl, base / f"node-{n}") for n, port, ctrl in s.kafka_nodes]


def replication_factor(s: Settings) -> int:
    return min(s.kafka_brokers, 3)


def node_properties(s: Settings, node: Node, secured: bool = True) -> str:
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes(s))
    rf = replication_factor(s)
    min_isr = min(MIN_INSYNC_REPLICAS, rf)
    return "\n".join(
        [
            "# Generated by deploy/kafka.py on every start; edit there, not here.",
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            *_listener_lines(s, node.port, node.controller_port, secured),
            f"log.dirs={node.data}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={min_isr}",
            f"offsets.topic.replication.factor={rf}",
            "offsets.topic.num.partitions=16",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={min_isr}",
            "transaction.state.log.num.partitions=16",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            # An out-of-sync replica never becomes leader: an acknowledged record is never dropped.
            "unclean.leader.election.enable=false",
            "group.initial.rebalance.delay.ms=0",
            # A killed node is noticed within a few seconds (defaults: 9 s broker session).
            "broker.session.timeout.ms=6000",
            "broker.heartbeat.interval.ms=1000",
            "log.retention.hours=168",
            "",
        ]
    )


def node_pid(s: Settings, node: Node) -> int | None:
    return _infra(s).pid(node.name)


def _cluster_id(s: Settings) -> str:
    path = cluster_dir(s) / "cluster-id"
    if path.exists():
        return path.read_text().strip()
    res = _java_tool(Paths.of(s), "kafka.tools.StorageTool", "random-uuid")
    if res.returncode != 0:
        raise StackError(f"kafka StorageTool random-uuid failed:\n{res.stdout}{res.stderr}")
    cluster_id = res.stdout.strip().splitlines()[-1].strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id + "\n")
    return cluster_id


def _format(s: Settings, node: Node) -> None:
    """Format a node's log dir once; again (wiped) only when the voters' ports changed."""
    stamp_file = node.dir / "format.stamp"
    stamp = f"voters={','.join(f'{n.node_id}@{n.controller_port}' for n in nodes(s))} port={node.port}"
    if (node.data / "meta.properties").exists():
        if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            return
        warn(f"{node.name}: ports changed: wiping {node.data} and formatting anew")
        shutil.rmtree(node.data)
        (cluster_dir(s) / SECURED_STAMP).unlink(missing_ok=True)
    cluster_id = _cluster_id(s)
    say(f"{node.name}: formatting {node.data} (cluster id {cluster_id})")
    res = _java_tool(
        Paths.of(s), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(node.props),
        "--ignore-formatted",
    )
    if res.returncode != 0:
        raise StackError(f"{node.name}: StorageTool format failed:\n{res.stdout}{res.stderr}")
    stamp_file.write_text(stamp + "\n")


def start_node(s: Settings, node: Node) -> int:
    """Launch one node unless it runs (no wait); returns its pid."""
    pid = node_pid(s, node)
    if pid is not None:
        return pid
    if _port_open(node.port) or _port_open(node.controller_port):
        raise StackError(f"{node.name}: port {node.port} or {node.controller_port} is taken by a process "
                            "this stack did not start")
    node.dir.mkdir(parents=True, exist_ok=True)
    write_atomically(node.props, node_properties(s, node))
    _format(s, node)
    pid = _infra(s).start(node.name)
    say(f"{node.name}: started pid {pid} on 127.0.0.1:{node.port} (controller {node.controller_port})")
    return pid


def kill_node(s: Settings, node: Node) -> bool:
    """SIGKILL one node (no clean shutdown: its page cache and open segments are what is left)."""
    return _infra(s).stop(node.name, kill=True)


def brokers_answering(s: Settings, auth: dict[str, object] | None = None) -> int:
    """How many brokers a metadata request reports (0 when none answers); as admin unless `auth`."""
    try:
        return _run_async(kafka_metadata(s.kafka_bootstrap, auth=admin_auth(s) if auth is None else auth))
    except Exception:
        return 0


def _all_nodes_agree(s: Settings, want: int, auth: dict[str, object] | None) -> bool:
    # Asked one by one: a node that is up but not yet serving would pass a bootstrap-wide request.
    return all(brokers_answering(dataclasses.replace(s, kafka_port=n.port, kafka_brokers=1), auth) >= want
               for n in nodes(s))


def wait_ready(s: Settings, want: int | None = None, timeout: float = CLUSTER_READY_TIMEOUT_S,
               auth: dict[str, object] | None = None) -> None:
    """Until every node answers a metadata request that reports `want` brokers (all by default)."""
    want = want or s.kafka_brokers
    deadline = time.monotonic() + timeout
    while not _all_nodes_agree(s, want, auth):
        dead = [n.name for n in nodes(s) if node_pid(s, n) is None]
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}:\n{tail(Paths.of(s).log(name), 15)}" for name in dead or ["kafka-1"])
            raise StackError(f"kafka cluster: fewer than {want} brokers answer on {s.kafka_bootstrap} "
                                f"after {timeout:.0f}s (not running: {dead or 'none'})\n{logs}")
        time.sleep(0.5)


def write_cluster_size(s: Settings, brokers: int) -> None:
    """Remember the cluster size in the state dir (Settings reads it: every client bootstraps from all)."""
    path = Paths.of(s).kafka / "brokers"
    if brokers <= 1:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{brokers}\n")


def start_cluster(s: Settings, wait: bool = True) -> list[int]:
    """Start every node (idempotent); the single-broker Kafka of this state dir is stopped first
    (node 1 takes its ports)."""
    Paths.of(s).ensure()
    if kafka_pid(s) is not None:
        say("kafka: stopping the single broker (the cluster takes its ports)")
        stop_kafka(s)
    if not _secured(cluster_dir(s)):
        _cluster_secure_once(s)
    pids = [start_node(s, node) for node in nodes(s)]
    if wait:
        wait_ready(s)
        say(f"kafka cluster: {s.kafka_brokers} brokers ready on {s.kafka_bootstrap}")
    return pids


def _cluster_secure_once(s: Settings) -> None:
    """The first start of this cluster since it is secured: every node once without security, to add
    the first users."""
    say("kafka cluster: adding the SCRAM users admin and broker (one start without security)")
    for node in nodes(s):
        if node_pid(s, node) is not None:  # running without security (started before it existed)
            _infra(s).stop(node.name)
    try:
        for node in nodes(s):
            node.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(node.props, node_properties(s, node))
            _format(s, node)
            write_atomically(node.props, node_properties(s, node, secured=False))
            _infra(s).start(node.name)
        wait_ready(s, auth={})
        _add_first_users(s, s.kafka_bootstrap)
    finally:
        stop_cluster(s)
    (cluster_dir(s) / SECURED_STAMP).write_text(SECURED_VERSION + "\n")


def stop_cluster(s: Settings) -> bool:
    stopped = False
    for node in nodes(s):
        stopped |= _infra(s).stop(node.name)
    return stopped


def stop_any_cluster(s: Settings) -> None:
    """Stop nodes of a cluster of any size left running from this state dir (before a mode switch)."""
    sup = _infra(s)
    if not sup.running():
        return
    for info in sup.rpc().getAllProcessInfo():
        if info["name"].startswith("kafka-"):
            sup.stop(info["name"])


def tools_classpath(s: Settings) -> str:
    lib = Paths.of(s).kafka / "tools-lib"
    if not any(lib.glob("kafka-tools-*.jar")):
        raise StackError(f"Kafka tools missing in {lib}: run deploy/bootstrap.sh")
    return f"{lib}/*"


# A short admin command starts fastest with the first JIT tier only; a throughput tool needs the full JIT.
QUICK_TOOL_JVM = ("-Xmx256M", "-XX:TieredStopAtLevel=1")


def run_tool(s: Settings, main: str, *args: str, timeout: float = 120,
             jvm_options: Sequence[str] = QUICK_TOOL_JVM) -> subprocess.CompletedProcess[str]:
    """Run one of Kafka's own command-line tools (artifact kafka-tools) against this stack (pass it a
    `--command-config client_config(s, principal)` to authenticate)."""
    cmd = [_java(), *jvm_options, f"-Dlog4j2.configurationFile={TOOLS_LOG4J_CONFIG}",
           "-cp", tools_classpath(s), main, *args]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
                          timeout=timeout)


def quorum_leader(s: Settings) -> int | None:
    """The active controller's node id, from the quorum itself (MetadataQuorumCommand)."""
    controllers = ",".join(f"127.0.0.1:{n.controller_port}" for n in nodes(s))
    res = run_tool(s, QUORUM_MAIN, "--bootstrap-controller", controllers,
                   "--command-config", str(client_config(s, CONTROLLER_USER)), "describe", "--status", timeout=60)
    match = re.search(r"^LeaderId:\s*(\d+)", res.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None
