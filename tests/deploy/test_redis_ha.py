"""The Redis HA overlay (prod-ha), rendered with every provider profile: the operator's resources
say primary + replica + three sentinels with auth, persistence, disruption budgets and spread; the
services and KEDA find the primary through the sentinels; the NetworkPolicies let sentinel,
replication and operator traffic through (evaluated here as the API server's semantics say), and
nothing else new."""

from __future__ import annotations

import ipaddress

import pytest
from deploy_checks import COMPOSED_TARGETS, render

from service.queue.connect import parse_multi_host
from service.queue.keys import QueueKeys
from service.settings import Settings

HA = ["k8s/overlays/prod-ha"] + [
    target for target in COMPOSED_TARGETS if target.startswith("k8s/overlays/prod-ha+")
]
NAMESPACE = {"kubernetes.io/metadata.name": "realcustom"}
APP = {"app.kubernetes.io/name": "realcustom"}


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# --- the operator's resources -------------------------------------------------------------------


@pytest.mark.parametrize("target", HA)
def test_primary_replica_and_three_sentinels_with_auth_persistence_and_budgets(target: str) -> None:
    docs = render(target)
    data, sentinels = _one(docs, "RedisReplication"), _one(docs, "RedisSentinel")
    assert data["spec"]["clusterSize"] == 2 and sentinels["spec"]["clusterSize"] == 3
    watch = sentinels["spec"]["redisSentinelConfig"]
    assert watch["redisReplicationName"] == data["metadata"]["name"]
    assert int(watch["quorum"]) == 2  # a majority of three
    for cr in (data, sentinels):
        assert cr["spec"]["kubernetesConfig"]["redisSecret"] == {
            "name": "realcustom-redis",
            "key": "password",
        }
        assert cr["spec"]["pdb"] == {"enabled": True, "maxUnavailable": 1}
        assert cr["spec"]["podSecurityContext"]["runAsNonRoot"] is True
        assert {c["topologyKey"] for c in cr["spec"]["topologySpreadConstraints"]} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }
    assert watch["redisReplicationPassword"]["secretKeyRef"]["name"] == "realcustom-redis"
    # Primary and replica never share a node.
    (hosts,) = [
        c for c in data["spec"]["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert hosts["whenUnsatisfiable"] == "DoNotSchedule"
    claim = data["spec"]["storage"]["volumeClaimTemplate"]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    conf = next(
        d for d in docs if d["metadata"]["name"] == data["spec"]["redisConfig"]["additionalRedisConfig"]
    )
    lines = conf["data"]["redis-additional.conf"].splitlines()
    assert {"appendonly yes", "maxmemory-policy noeviction"} <= set(lines)
    # The single Redis is gone.
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


@pytest.mark.parametrize("target", HA)
def test_services_and_keda_find_the_primary_through_the_sentinels(target: str) -> None:
    docs = render(target)
    group = _one(docs, "RedisSentinel")["spec"]["redisSentinelConfig"]["masterGroupName"]
    sentinel_name = _one(docs, "RedisSentinel")["metadata"]["name"]
    pods = [f"{sentinel_name}-sentinel-{i}.{sentinel_name}-sentinel-headless" for i in range(3)]
    for role in ("api", "worker"):
        settings = Settings(**{k.lower(): v for k, v in _config(docs, role).items()})
        url = parse_multi_host(settings.redis_url)
        assert (url.service, url.hosts) == (group, [(pod, 26379) for pod in pods])
        pod = next(
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"realcustom-{role}"
        )
        env = {e["name"]: e for e in pod["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "realcustom-redis"
    # An accepted job is on the replica before the API says so.
    assert _config(docs, "api")["REDIS_ACK_REPLICAS"] == "1"
    scaled = _one(docs, "ScaledObject")
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis-sentinel-streams"
        metadata = trigger["metadata"]
        assert metadata["sentinelMaster"] == group
        addresses = [address.strip() for address in metadata["addresses"].split(",")]
        assert addresses == [f"{pod}.realcustom.svc:26379" for pod in pods]
        assert metadata["stream"] == QueueKeys(Settings().queue_name).stream
    auth = {ref["parameter"] for ref in _one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]}
    assert auth == {"password", "sentinelPassword"}


def _config(docs: list[dict], role: str) -> dict[str, str]:
    from deploy_checks import config

    return config(docs, role)


# --- NetworkPolicies, evaluated ------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the only form these manifests use
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict, labels: dict, namespace: dict, ip: str | None) -> bool:
    if "ipBlock" in peer:
        return ip is not None and ipaddress.ip_address(ip) in ipaddress.ip_network(peer["ipBlock"]["cidr"])
    if ip is not None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], namespace):
            return False
    elif namespace != NAMESPACE:
        return False
    return _selects(peer.get("podSelector", {}), labels)


def _port_matches(rule: dict, port: int) -> bool:
    return "ports" not in rule or any(p["port"] == port for p in rule["ports"])


def _allowed(
    policies: list[dict], direction: str, pod: dict, peer: tuple[dict, dict, str | None], port: int
) -> bool:
    """Whether the policies selecting `pod` (in our namespace) allow this flow in `direction`."""
    kind = "Ingress" if direction == "ingress" else "Egress"
    selecting = [
        p for p in policies if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    key = "from" if direction == "ingress" else "to"
    return any(
        _port_matches(rule, port) and any(_peer_matches(peer_, *peer) for peer_ in rule.get(key, [{}]))
        for policy in selecting
        for rule in policy["spec"].get(direction, [])
    )


def flow_allowed(policies: list[dict], source: tuple[dict, dict], target: dict | str, port: int) -> bool:
    """source = (pod labels, namespace labels); target = pod labels in our namespace, or an IP."""
    labels, namespace = source
    if isinstance(target, str):
        return namespace != NAMESPACE or _allowed(policies, "egress", labels, ({}, {}, target), port)
    egress_ok = namespace != NAMESPACE or _allowed(
        policies, "egress", labels, (target, NAMESPACE, None), port
    )
    return egress_ok and _allowed(policies, "ingress", target, (labels, namespace, None), port)


API = ({**APP, "app.kubernetes.io/component": "api"}, NAMESPACE)
WORKER = ({**APP, "app.kubernetes.io/component": "worker"}, NAMESPACE)
DATA = ({**APP, "app.kubernetes.io/component": "redis"}, NAMESPACE)
SENTINEL = ({**APP, "app.kubernetes.io/component": "redis-sentinel"}, NAMESPACE)
KEDA = ({"app": "keda-operator"}, {"kubernetes.io/metadata.name": "keda"})
OPERATOR = ({"name": "redis-operator"}, {"kubernetes.io/metadata.name": "ot-operators"})
STRANGER = ({"app": "something-else"}, NAMESPACE)
ELSEWHERE = ({"app.kubernetes.io/component": "api"}, {"kubernetes.io/metadata.name": "other"})


def test_the_operator_puts_the_crs_labels_on_its_pods() -> None:
    """The policies select the operator's pods by the labels of the CRs (v0.26.0 merges them in,
    internal/controller/common/labels.go): check the CRs carry the labels the policies select."""
    docs = render("k8s/overlays/prod-ha")
    assert _one(docs, "RedisReplication")["metadata"]["labels"].items() >= DATA[0].items()
    assert _one(docs, "RedisSentinel")["metadata"]["labels"].items() >= SENTINEL[0].items()


@pytest.mark.parametrize("target", HA)
def test_network_policies_allow_sentinel_replication_and_client_traffic(target: str) -> None:
    policies = [d for d in render(target) if d["kind"] == "NetworkPolicy"]
    allowed = [
        (SENTINEL, DATA, 6379),  # sentinels monitor and reconfigure the data nodes
        (DATA, DATA, 6379),  # the replica replicates from the primary
        (SENTINEL, SENTINEL, 26379),  # failover votes
        (API, DATA, 6379),
        (API, SENTINEL, 26379),
        (WORKER, DATA, 6379),
        (WORKER, SENTINEL, 26379),
        (KEDA, DATA, 6379),
        (KEDA, SENTINEL, 26379),
        (OPERATOR, DATA, 6379),
        (OPERATOR, SENTINEL, 26379),
    ]
    for source, target_pod, port in allowed:
        assert flow_allowed(policies, source, target_pod[0], port), (source, target_pod, port)
    denied = [
        (STRANGER, DATA, 6379),
        (STRANGER, SENTINEL, 26379),
        (ELSEWHERE, DATA, 6379),
        (API, DATA, 26379),
        (WORKER, API, 8000),
        (SENTINEL, WORKER, 9101),
    ]
    for source, target_pod, port in denied:
        assert not flow_allowed(policies, source, target_pod[0], port), (source, target_pod, port)


@pytest.mark.parametrize("target", ["k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_workers_reach_cluster_dns_and_the_node_local_cache(target: str) -> None:
    policies = [d for d in render(target) if d["kind"] == "NetworkPolicy"]
    kube_dns = ({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
    (worker_policy,) = [p for p in policies if p["metadata"]["name"] == "realcustom-worker"]
    assert _allowed([worker_policy], "egress", WORKER[0], (kube_dns[0], kube_dns[1], None), 53)
    assert flow_allowed(policies, WORKER, "169.254.20.10", 53)  # NodeLocal DNSCache
    assert not flow_allowed(policies, WORKER, "169.254.20.10", 80)
    assert not flow_allowed(policies, WORKER, "203.0.113.7", 443)  # no internet
