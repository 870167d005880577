"""deploy/overlays/fleet-cache: token-proxy sharing tokens through a password-protected
Valkey that only the sidecars may reach.

Rendering and schema validation are in tests/test_deploy.py (the overlay is one of its
kustomizations); here, what makes the cache work and keeps it closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.config import load_config
from tests.test_deploy import (
    APP,
    FLEET_CACHE_OVERLAY,
    SIDECAR,
    Manifest,
    config_document,
    config_file_paths,
    container,
    find,
    mount_for,
    render_kustomization,
    stub_config,
    volume,
)

CACHE_SECRET = "token-proxy-fleet-cache"


@pytest.fixture(scope="module")
def fleet() -> list[Manifest]:
    return render_kustomization(FLEET_CACHE_OVERLAY)


def deployment(manifests: list[Manifest], name: str) -> Manifest:
    return find(manifests, "Deployment", name)


def spec_of(manifests: list[Manifest], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = deployment(manifests, name)["spec"]["template"]["spec"]
    return spec


def test_the_config_loads_with_its_token_cache(fleet: list[Manifest], tmp_path: Path) -> None:
    document = config_document(fleet)
    path = stub_config(document, tmp_path)
    # The key must be a real one's length (the stub's placeholder is shorter).
    key_path = tmp_path / document["token_cache"]["encryption_key_file"].lstrip("/")
    key_path.write_text("A" * 44 + "\n")
    config = load_config(str(path))
    assert config.token_cache is not None
    assert config.token_cache.redis.password_file is not None
    assert {u.name for u in config.upstreams} == {"inventory", "payments"}
    assert all(u.token.cache == "shared" for u in config.upstreams)


def test_the_sidecar_reaches_redis_through_its_service(fleet: list[Manifest]) -> None:
    url = urlsplit(config_document(fleet)["token_cache"]["redis"]["url"])
    service = find(fleet, "Service", url.hostname)
    assert [port["port"] for port in service["spec"]["ports"]] == [url.port]
    selector = service["spec"]["selector"]
    labels = deployment(fleet, url.hostname or "")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert deployment(fleet, APP)["spec"]["replicas"] > 2


def test_cache_files_come_from_the_cache_secret_into_the_sidecar_only(
    fleet: list[Manifest],
) -> None:
    spec = spec_of(fleet, APP)
    sidecar = container(spec, SIDECAR)
    secret = find(fleet, "Secret", CACHE_SECRET)
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    cache = dict(config_file_paths(config_document(fleet)["token_cache"], "token_cache"))
    assert set(cache) == {"token_cache.redis.password_file", "token_cache.encryption_key_file"}
    for key_path, file_path in cache.items():
        mount = mount_for(sidecar, file_path)
        assert mount.get("readOnly") is True
        source = volume(spec, mount["name"])["secret"]
        assert source["secretName"] == CACHE_SECRET
        assert source["defaultMode"] & 0o007 == 0, "must not be world-readable"
        items = {item["path"]: item["key"] for item in source["items"]}
        relative = file_path[len(mount["mountPath"].rstrip("/")) + 1 :]
        assert items[relative] in keys, key_path
        app_mounts = {m["name"] for m in container(spec, APP).get("volumeMounts", [])}
        assert mount["name"] not in app_mounts


def test_redis_requires_the_password_the_sidecars_send(fleet: list[Manifest]) -> None:
    (valkey,) = spec_of(fleet, "token-proxy-redis")["containers"]
    arguments = valkey["args"]
    password = arguments[arguments.index("--requirepass") + 1]
    assert password.startswith("$(")
    assert password.endswith(")")
    variable = password[2:-1]
    (env,) = [e for e in valkey["env"] if e["name"] == variable]
    reference = env["valueFrom"]["secretKeyRef"]
    assert reference["name"] == CACHE_SECRET
    sidecar_items = volume(spec_of(fleet, APP), "token-cache-secrets")["secret"]["items"]
    password_file = config_document(fleet)["token_cache"]["redis"]["password_file"]
    assert {item["path"]: item["key"] for item in sidecar_items}[
        Path(password_file).name
    ] == reference["key"]
    # Nothing persisted: entries are worth one token request each.
    assert arguments[arguments.index("--save") + 1] == ""
    assert "--maxmemory" in arguments


def test_only_token_proxy_pods_may_connect(fleet: list[Manifest]) -> None:
    policy = find(fleet, "NetworkPolicy")
    spec = policy["spec"]
    redis_labels = deployment(fleet, "token-proxy-redis")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "same namespace, selected pods only"
    allowed = peer["podSelector"]["matchLabels"]
    app_labels = deployment(fleet, APP)["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= app_labels.items()
    assert allowed == {"token-proxy/sidecar": "true"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_redis_runs_with_a_restrictive_security_context(fleet: list[Manifest]) -> None:
    spec = spec_of(fleet, "token-proxy-redis")
    (valkey,) = spec["containers"]
    context = valkey["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    assert "memory" in valkey["resources"]["limits"]
