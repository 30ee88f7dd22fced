"""Highly available Redis topologies on loopback, started by the tests on free ports.

- `SentinelSetup`: a primary, one replica and three sentinels (quorum 2) watching service `queue`;
  `kill_primary()` SIGKILLs the primary and waits until the sentinels promote the replica.
  `SentinelSetup.shipped(directory)`: the same with the configuration the Redis HA overlay ships
  (k8s/overlays/prod-ha, rendered): its data nodes' redis.conf, its sentinels' group, quorum and
  timings, its password requirement, its node counts (`shipped_sentinel_config`).
- `ClusterSetup`: three masters created with `redis-cli --cluster create ... --cluster-yes`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import redis
import yaml
from service_processes import free_port, wait_until

SERVICE = "queue"
ROOT = Path(__file__).resolve().parents[2]
HA_OVERLAY = ROOT / "k8s/overlays/prod-ha"


@dataclass(frozen=True)
class SentinelConfig:
    """What a Sentinel setup is made of; `shipped_sentinel_config()` reads the HA overlay's."""

    service: str = SERVICE
    data_nodes: int = 2
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 4000
    parallel_syncs: int = 1
    # The data nodes' redis.conf (None: the loopback defaults of `_data_node_args`).
    data_conf: str | None = None
    # The API's REDIS_ACK_REPLICAS in that deployment.
    ack_replicas: int = 0


def shipped_sentinel_config() -> SentinelConfig:
    """The Redis HA overlay as kustomize renders it (the manifests `make deploy` applies): the
    redis-operator's RedisReplication and RedisSentinel, the data nodes' ConfigMap, the API's."""
    kubectl = Path(sys.executable).parent / "kubectl"
    rendered = subprocess.run(
        [str(kubectl if kubectl.exists() else "kubectl"), "kustomize", str(HA_OVERLAY)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    (data,) = [d for d in docs if d["kind"] == "RedisReplication"]
    (sentinel,) = [d for d in docs if d["kind"] == "RedisSentinel"]
    (conf,) = [
        d for d in docs if d["metadata"]["name"] == data["spec"]["redisConfig"]["additionalRedisConfig"]
    ]
    (api,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("realcustom-api-config")
    ]
    watch = sentinel["spec"]["redisSentinelConfig"]
    assert data["spec"]["kubernetesConfig"]["redisSecret"], "the shipped Redis requires a password"
    return SentinelConfig(
        service=watch["masterGroupName"],
        data_nodes=data["spec"]["clusterSize"],
        sentinels=sentinel["spec"]["clusterSize"],
        quorum=int(watch["quorum"]),
        down_after_ms=int(watch["downAfterMilliseconds"]),
        failover_timeout_ms=int(watch["failoverTimeout"]),
        parallel_syncs=int(watch["parallelSyncs"]),
        data_conf=conf["data"]["redis-additional.conf"],
        ack_replicas=int(api["data"].get("REDIS_ACK_REPLICAS", 0)),
    )


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; the Redis HA tests need it (apt install redis)")
    return path


def _answers(port: int, password: str | None = None) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, password=password)
    try:
        with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
            return bool(client.ping())
        return False
    finally:
        client.close()


class _Processes:
    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.processes: dict[int, subprocess.Popen] = {}
        self.arguments: dict[int, tuple[str, ...]] = {}

    def restart(self, port: int) -> None:
        """Start the server of `port` again, with its arguments and data directory."""
        self.spawn(port, *self.arguments[port])

    def spawn(self, port: int, *args: str) -> None:
        self.arguments[port] = args
        self.processes[port] = subprocess.Popen(
            [_binary("redis-server"), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers(port, self.password), 10, f"redis on port {port}")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True, password=self.password)

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def _data_node_args(port: int, directory: Path, aof: bool = False) -> list[str]:
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    return ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "", *persistence]


class SentinelSetup(_Processes):
    """Primary + replica(s) + sentinels; `url` is the service's `redis+sentinel://` REDIS_URL.
    With `password`, the data nodes and the sentinels all require it (AUTH)."""

    def __init__(
        self,
        directory: Path,
        down_after_ms: int = 1000,
        password: str | None = None,
        config: SentinelConfig | None = None,
    ) -> None:
        super().__init__(directory, password)
        self.config = config or SentinelConfig(down_after_ms=down_after_ms)
        self.service = self.config.service
        ports = [free_port() for _ in range(self.config.data_nodes)]
        self.primary_port, self.replica_ports = ports[0], ports[1:]
        self.replica_port = self.replica_ports[0]
        self.sentinel_ports = [free_port() for _ in range(self.config.sentinels)]
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{self.service}"

    @classmethod
    def shipped(cls, directory: Path, password: str = "shipped-secret") -> SentinelSetup:
        """The HA overlay's configuration on loopback (its Secret's password stands in)."""
        return cls(directory, password=password, config=shipped_sentinel_config())

    def _data_args(self, port: int) -> list[str]:
        directory = self.directory / str(port)
        directory.mkdir(exist_ok=True)
        if self.config.data_conf is None:
            return _data_node_args(port, directory)
        conf = self.directory / "redis-additional.conf"
        conf.write_text(self.config.data_conf)
        # The shipped file first; the command line only places the node on loopback.
        return [str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]

    def start(self) -> None:
        config = self.config
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.spawn(self.primary_port, *self._data_args(self.primary_port), *auth)
        for port in self.replica_ports:
            self.spawn(
                port, *self._data_args(port), *auth, "--replicaof", "127.0.0.1", str(self.primary_port)
            )
        for port in self.sentinel_ports:
            sentinel_conf = self.directory / f"sentinel-{port}.conf"
            sentinel_conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {config.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {config.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {config.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} {config.parallel_syncs}\n"
                + (
                    f"requirepass {self.password}\nsentinel sentinel-pass {self.password}\n"
                    f"sentinel auth-pass {self.service} {self.password}\n"
                    if self.password
                    else ""
                )
            )
            self.spawn(port, str(sentinel_conf), "--sentinel")
        wait_until(self._settled, 30, "the sentinels to see the replica and each other", interval_s=0.2)

    def _settled(self) -> bool:
        for port in self.sentinel_ports:
            client = self.client(port)
            try:
                state = client.sentinel_master(self.service)
            except redis.RedisError:
                return False
            finally:
                client.close()
            others, replicas = int(state["num-other-sentinels"]), int(state["num-slaves"])
            if others < len(self.sentinel_ports) - 1 or replicas < len(self.replica_ports):
                return False
        for port in self.replica_ports:
            replica = self.client(port)
            try:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            finally:
                replica.close()
        return True

    def primary(self) -> tuple[str, int]:
        client = self.client(self.sentinel_ports[0])
        try:
            host, port = client.sentinel_get_master_addr_by_name(self.service)
            return host, int(port)
        finally:
            client.close()

    def kill_primary(self, timeout_s: float = 30) -> int:
        """SIGKILL the current primary; returns the new primary's port once the sentinels agree."""
        _host, old = self.primary()
        self.kill(old)
        wait_until(lambda: self.primary()[1] != old, timeout_s, "the sentinels to promote the replica", 0.1)
        new = self.primary()[1]
        wait_until(lambda: self._role(new) == "master", timeout_s, "the replica to become a primary", 0.1)
        return new

    def _role(self, port: int) -> str:
        client = self.client(port)
        try:
            return client.info("replication")["role"]
        except redis.RedisError:
            return ""
        finally:
            client.close()


class ClusterSetup(_Processes):
    """Three masters in one Redis Cluster; `url` is its `redis+cluster://` REDIS_URL. With `aof`, a
    node killed and restarted comes back with its data (like a single Redis); with `replicas`, each
    master has that many replicas, one of which takes over when the master fails."""

    def __init__(self, directory: Path, masters: int = 3, aof: bool = False, replicas: int = 0) -> None:
        super().__init__(directory)
        self.aof = aof
        self.replicas = replicas
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        for port in self.ports:
            directory = self.directory / str(port)
            directory.mkdir(exist_ok=True)
            self.spawn(
                port,
                *_data_node_args(port, directory, self.aof),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(directory / "nodes.conf"),
                "--cluster-port",
                str(free_port()),
                "--cluster-node-timeout",
                "2000",
            )
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def port_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        client = redis.Redis(port=next(iter(self.processes)), decode_responses=True)  # a live node
        try:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, (_host, port, *_ids), *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(port)
        finally:
            client.close()
        raise LookupError(f"no master serves the slot of {key}")

    def wait_ok(self) -> None:
        wait_until(self._ok, 30, "the cluster to report ok on every node", interval_s=0.2)

    def wait_replicated(self, port: int) -> None:
        """Until every replica of the master on `port` has all of its writes."""

        def caught_up() -> bool:
            client = redis.Redis(port=port, decode_responses=True)
            try:
                info = client.info("replication")
            finally:
                client.close()
            offsets = [info[f"slave{index}"]["offset"] for index in range(info["connected_slaves"])]
            return bool(offsets) and all(offset == info["master_repl_offset"] for offset in offsets)

        wait_until(caught_up, 10, f"the replicas of {port} to catch up", interval_s=0.05)

    def kill_master_of(self, key: str, timeout_s: float = 30) -> int:
        """SIGKILL the master serving `key`; returns the port of the replica promoted in its place."""
        old = self.port_of(key)
        self.kill(old)
        wait_until(lambda: self._serving(key, old), timeout_s, "a replica to take over the slot", 0.2)
        self.wait_ok()
        return self.port_of(key)

    def _serving(self, key: str, old: int) -> bool:
        try:
            return self.port_of(key) != old
        except redis.RedisError:
            return False

    def _ok(self) -> bool:
        for port in self.processes:  # the live nodes
            client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
            try:
                if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True
