"""The ingress components, rendered with every provider profile: the proxy's limits are the API's
(read from service/settings.py and the overlay's API ConfigMap, never written here a second time),
the event streams are not buffered, and the provider picks the ingress and gateway classes."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_checks import COMPOSED_TARGETS, ROOT, config, render

from service.api.routes.events import KEEPALIVE_S
from service.settings import Settings

NGINX = [target for target in COMPOSED_TARGETS if "+ingress-nginx+" in target]
GATEWAY = [target for target in COMPOSED_TARGETS if "+gateway-api+" in target]
# The class each provider profile sets (its ingress controller, its Gateway controller).
CLASSES = {
    "gke": ("nginx", "gke-l7-regional-external-managed"),
    "eks": ("nginx", "aws-alb"),
    "aks": ("webapprouting.kubernetes.azure.com", "azure-alb-external"),
    "gpu-operator": ("nginx", "eg"),
}
EVENTS_PATH = "/jobs/{job_id}/events"


def api_settings(docs: list[dict]) -> Settings:
    """What the API pods run with: the defaults, overridden by their ConfigMap."""
    return Settings(**{key.lower(): value for key, value in config(docs, "api").items()})


def header_timeout_s(settings: Settings) -> float:
    """The API's header timeout; BODY_TIMEOUT_S bounds the whole request read until it has its own."""
    return getattr(settings, "http_header_timeout_s", settings.body_timeout_s)


def nginx_size(text: str) -> int:
    """An nginx size (`40m`, `16k`, `1048576`) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert match, text
    return int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2).lower()]


def _ingresses(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Ingress"}


def test_the_api_serves_the_event_path_the_proxies_single_out() -> None:
    from service.api.app import create_app

    schema = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    assert "get" in schema["paths"][EVENTS_PATH]


@pytest.mark.parametrize("target", NGINX)
def test_nginx_limits_match_the_api(target: str) -> None:
    docs = render(target)
    settings = api_settings(docs)
    ingresses = _ingresses(docs)
    main, events = ingresses["realcustom-api"], ingresses["realcustom-api-events"]
    notes = main["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    # Every body the API accepts passes nginx (whose default is 1 MiB), and nothing it refuses.
    assert nginx_size(notes[prefix + "proxy-body-size"]) == settings.max_body_bytes
    # A synchronous request waits JOB_TIMEOUT_S for its image: nginx must wait longer, not much longer.
    read_s = int(notes[prefix + "proxy-read-timeout"])
    assert settings.job_timeout_s < read_s <= settings.job_timeout_s + 60
    assert int(notes[prefix + "proxy-send-timeout"]) == settings.body_timeout_s
    # Event streams: unbuffered, open as long as the API keeps them (a comment every KEEPALIVE_S).
    events_notes = events["metadata"]["annotations"]
    assert events_notes[prefix + "proxy-buffering"] == "off"
    events_read_s = int(events_notes[prefix + "proxy-read-timeout"])
    assert events_read_s >= settings.events_max_duration_s and events_read_s > KEEPALIVE_S
    (rule,) = events["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert events_notes[prefix + "use-regex"] == "true" and path["pathType"] == "ImplementationSpecific"
    assert re.fullmatch(path["path"], EVENTS_PATH.replace("{job_id}", "4f2a9c"))
    assert not re.fullmatch(path["path"], "/jobs/4f2a9c") and not re.fullmatch(path["path"], "/jobs")
    # Both send to the API's Service port.
    for ingress in (main, events):
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "realcustom-api", "port": {"name": "http"}}
        assert ingress["spec"]["ingressClassName"] == CLASSES[target.rsplit("+", 1)[1]][0]


def test_nginx_controller_client_limits_match_the_api() -> None:
    values = yaml.safe_load((ROOT / "k8s/components/ingress-nginx/controller-values.yaml").read_text())
    nginx = values["controller"]["config"]
    for target in NGINX:
        settings = api_settings(render(target))
        assert float(nginx["client-body-timeout"]) == settings.body_timeout_s
        assert float(nginx["client-header-timeout"]) == header_timeout_s(settings)
        count, size = nginx["large-client-header-buffers"].split()
        assert nginx_size(size) >= settings.http_max_header_bytes and int(count) >= 2


def _duration_s(text: str) -> float:
    return sum(
        int(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", text)
    )


@pytest.mark.parametrize("target", GATEWAY)
def test_gateway_timeouts_match_the_api(target: str) -> None:
    docs = render(target)
    settings = api_settings(docs)
    (route,) = [d for d in docs if d["kind"] == "HTTPRoute"]
    (gateway,) = [d for d in docs if d["kind"] == "Gateway"]
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"]}]
    assert gateway["spec"]["gatewayClassName"] == CLASSES[target.rsplit("+", 1)[1]][1]
    timeouts = {}
    for rule in route["spec"]["rules"]:
        (match,) = rule["matches"]
        assert match["path"]["type"] == "PathPrefix"
        timeouts[match["path"]["value"]] = _duration_s(rule["timeouts"]["request"])
        assert rule["backendRefs"] == [{"name": "realcustom-api", "port": 80}]
    # A Gateway's request timeout spans the whole exchange, upload included.
    assert timeouts["/jobs"] >= settings.events_max_duration_s  # the event streams live under /jobs
    assert timeouts["/customize"] >= settings.job_timeout_s + settings.body_timeout_s
    assert timeouts["/"] >= settings.body_timeout_s
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "realcustom-api")
    assert [p["port"] for p in service["spec"]["ports"]] == [80]
