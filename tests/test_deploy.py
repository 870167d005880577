"""The container image recipe and the Kubernetes manifests under deploy/.

No container engine or cluster runs here, so each is checked by what can run:
the Dockerfile with hadolint, its install steps replayed into a fresh venv, and its
structure read instruction by instruction; the Kustomize tree rendered by a small
reader of the features it uses (cross-checked against `kubectl kustomize` where
kubectl exists), every manifest validated with kubernetes-validate against the
Kubernetes schemas, and the pod's contract with the proxy (native sidecar, probes,
proxy environment, mounts, security context) asserted field by field. The
ConfigMap's embedded configuration is loaded by the real `load_config`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy
from proxy.config import load_config
from tests.support import tools

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "overlays" / "example"
FLEET_CACHE_OVERLAY = DEPLOY / "overlays" / "fleet-cache"
WORKLOAD_IDENTITY_OVERLAY = DEPLOY / "overlays" / "workload-identity"
KUSTOMIZATIONS = [BASE, OVERLAY, FLEET_CACHE_OVERLAY, WORKLOAD_IDENTITY_OVERLAY]
# Native sidecars (restartPolicy: Always on an init container) are on by default from
# 1.29; validate against the oldest schema we claim (1.30) and the newest one known.
KUBERNETES_VERSIONS = ["1.30.0", "latest"]
BUILD_SCRIPT = "deploy/image/build-venv.sh"
# The modules setup.py compiles, and the library they share (read from setup.py, not
# imported: it runs setup() at import).
_SETUP = (REPO / "setup.py").read_text()
COMPILED_MODULES = re.findall(r'"(proxy/[\w/]+\.py)"', _SETUP)
SHARED_LIBRARY = re.findall(r'group_name="proxy\.(\w+)"', _SETUP)[0] + "__mypyc"
SIDECAR = "token-proxy"
APP = "order-service"
CONFIG_KEY = "config.yaml"

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------
# A reader of the Kustomize features deploy/ uses, no more
# ---------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
}


def render_kustomization(directory: Path) -> list[Manifest]:
    """The manifests `kubectl kustomize directory` would print, for the features we use.

    Refuses any other kustomization feature, so a new one in deploy/ fails here
    until this reader learns it, instead of being silently ignored.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization keys this reader does not know: {unknown}"
    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            manifests.extend(render_kustomization(path))
        else:
            manifests.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in kustomization.get("patches", []):
        _apply_patch(manifests, patch)
    if "namespace" in kustomization:
        for manifest in manifests:
            manifest["metadata"]["namespace"] = kustomization["namespace"]
    for label_set in kustomization.get("labels", []):
        assert set(label_set) <= {"pairs", "includeSelectors"}, label_set
        assert not label_set.get("includeSelectors", False), "selector labels are not supported"
        for manifest in manifests:
            manifest["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    for image in kustomization.get("images", []):
        for manifest in manifests:
            for container in _containers_anywhere(manifest):
                _retag(container, image)
    return manifests


def _apply_patch(manifests: list[Manifest], patch: dict[str, Any]) -> None:
    assert set(patch) == {"target", "patch"}, f"only inline JSON 6902 patches: {patch}"
    target = patch["target"]
    matched = [m for m in manifests if _matches_target(m, target)]
    assert matched, f"patch target matches nothing: {target}"
    for manifest in matched:
        for operation in yaml.safe_load(patch["patch"]):
            _apply_json_patch_operation(manifest, operation)


def _matches_target(manifest: Manifest, target: dict[str, str]) -> bool:
    group, _, version = manifest["apiVersion"].rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": manifest["kind"],
        "name": manifest["metadata"]["name"],
    }
    return all(actual[key] == value for key, value in target.items())


def _apply_json_patch_operation(document: Manifest, operation: dict[str, Any]) -> None:
    """RFC 6902 add/replace/remove; pointers unescaped per RFC 6901."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
    parent: Any = document
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    op = operation["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, operation["value"])
        elif op == "replace":
            parent[index] = operation["value"]
        elif op == "remove":
            del parent[index]
        else:
            raise AssertionError(f"unsupported JSON patch op {op}")
    elif op in ("add", "replace"):
        assert op == "add" or last in parent, f"replace of missing {operation['path']}"
        parent[last] = operation["value"]
    elif op == "remove":
        del parent[last]
    else:
        raise AssertionError(f"unsupported JSON patch op {op}")


def _containers_anywhere(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers_anywhere(item)


def _split_image(reference: str) -> tuple[str, str | None, str | None]:
    name, _, digest = reference.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def _retag(container: dict[str, Any], image: dict[str, str]) -> None:
    name, tag, digest = _split_image(container["image"])
    if name != image["name"]:
        return
    name = image.get("newName", name)
    tag = image.get("newTag", tag)
    digest = image.get("digest", digest)
    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# ---------------------------------------------------------------------------
# Finding things in the rendered manifests
# ---------------------------------------------------------------------------


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and name in (None, m["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    everything: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    found = [c for c in everything if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}, found {len(found)}"
    return found[0]


def config_document(manifests: list[Manifest]) -> dict[str, Any]:
    configmap = find(manifests, "ConfigMap", "token-proxy-config")
    document: dict[str, Any] = yaml.safe_load(configmap["data"][CONFIG_KEY])
    return document


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in c.get("env", [])}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def mount_for(c: dict[str, Any], file_path: str) -> dict[str, Any]:
    """The volumeMount of `c` under which `file_path` lies (the deepest one)."""
    mounts = [
        m
        for m in c.get("volumeMounts", [])
        if file_path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{file_path} lies under no volumeMount of container {c['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name}"
    return found[0]


def config_file_paths(node: Any, key_path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, absolute path) of every file the configuration names."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{key_path}.{key}" if key_path else str(key)
            if isinstance(value, str) and (key.endswith("_file") or key == "write_ca_cert_to"):
                yield here, value
            else:
                yield from config_file_paths(value, here)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from config_file_paths(item, f"{key_path}[{index}]")


def stub_config(document: dict[str, Any], root: Path) -> Path:
    """Write `document` to root/config.yaml with every file it names moved under root.

    Input files (`*_file`) get placeholder contents, as the pod's mounts would hold
    real ones; output locations get their directory, as the pod's emptyDir would.
    """
    document = copy.deepcopy(document)

    def move(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and (key.endswith("_file") or key == "write_ca_cert_to"):
                    moved = root / value.lstrip("/")
                    moved.parent.mkdir(parents=True, exist_ok=True)
                    if key.endswith("_file"):
                        moved.write_text("stub-credential-for-tests\n")
                    node[key] = str(moved)
                else:
                    move(value)
        elif isinstance(node, list):
            for item in node:
                move(item)

    move(document)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def overlay() -> list[Manifest]:
    return render_kustomization(OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return render_kustomization(BASE)


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value
    return defaults


def build_stage_copies() -> list[str]:
    """Sources the build stage COPYs from the build context."""
    sources: list[str] = []
    for keyword, arguments in dockerfile_stages()[0]:
        if keyword == "COPY":
            *copied, _destination = shlex.split(arguments)
            sources.extend(s.rstrip("/") for s in copied if not s.startswith("--"))
    return sources


def test_dockerfile_is_clean_under_hadolint() -> None:
    hadolint = tools.hadolint()
    result = subprocess.run(
        [
            str(hadolint),
            "--no-color",
            "--failure-threshold",
            "style",
            "--require-label",
            "org.opencontainers.image.title:text",
            "--require-label",
            "org.opencontainers.image.version:text",
            "--require-label",
            "org.opencontainers.image.licenses:spdx",
            str(REPO / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_venv_and_ships_only_that() -> None:
    build, final = dockerfile_stages()
    args = dockerfile_arg_defaults()
    # The compiled modules are built against the build image's Python and libc: the
    # runtime image must be the same Python version on the same Debian release.
    assert args["BUILD_IMAGE"] == "python:3.11-bookworm"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert build[0][1] == "${BUILD_IMAGE} AS build"
    assert final[0][1] == "${PYTHON_IMAGE}"
    final_keywords = [keyword for keyword, _ in final]
    # Only the venv crosses over; nothing is installed or compiled in the final stage.
    copies = [arguments for keyword, arguments in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/token-proxy /opt/token-proxy"]
    assert "RUN" not in final_keywords
    assert "ADD" not in final_keywords
    runs = [arguments for keyword, arguments in build if keyword == "RUN"]
    assert runs == [f"{BUILD_SCRIPT} /opt/token-proxy"]


def test_dockerfile_runtime_contract() -> None:
    final = dockerfile_stages()[-1]
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in final:
        by_keyword.setdefault(keyword, []).append(arguments)
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["token-proxy", "run"]
    assert "CMD" not in by_keyword
    user = by_keyword["USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER must be numeric: {user}"
    assert gid.isdigit(), f"USER must name a numeric group: {user}"
    assert int(uid) != 0
    assert int(gid) != 0
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert sorted(by_keyword["EXPOSE"][-1].split()) == ["15080", "15090"]
    env = " ".join(by_keyword["ENV"])
    assert "TOKEN_PROXY_CONFIG=/etc/token-proxy/config.yaml" in env
    assert "PATH=/opt/token-proxy/bin:$PATH" in env
    labels = " ".join(by_keyword["LABEL"])
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert dockerfile_arg_defaults()["VERSION"] == proxy.__version__


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore should be an allow-list"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted == set(build_stage_copies())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    os.environ.get("TOKEN_PROXY_BUILD") == "compiled",
    reason="builds its own venv whatever the tree holds: run once, in the pure-Python pass",
)
def test_image_install_steps_give_a_working_token_proxy(tmp_path: Path) -> None:
    """Replays the build stage: its COPYs into a fresh tree, its build script into a fresh venv."""
    source = tmp_path / "src"
    source.mkdir()
    for copied in build_stage_copies():
        origin = REPO / copied
        assert origin.exists(), f"the Dockerfile COPYs {copied}, which does not exist"
        # What .dockerignore keeps out: bytecode, and modules compiled in place.
        ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
        if origin.is_dir():
            shutil.copytree(origin, source / copied, ignore=ignored)
        else:
            (source / copied).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / copied)
    venv = tmp_path / "venv"
    # The image installs with PIP_NO_CACHE_DIR; here the local wheel cache keeps it fast.
    build = subprocess.run(
        [str(source / BUILD_SCRIPT), str(venv)],
        cwd=source,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    executable = venv / "bin" / "token-proxy"
    assert executable.exists()
    assert not (venv / "bin" / "pip").exists(), "the venv should carry no installer"
    # Compiled at install: the pod's read-only root filesystem cannot take .pyc files.
    (package,) = venv.glob("lib/python3*/site-packages/proxy")
    assert list(package.glob("__pycache__/*.pyc"))
    # The data path is compiled (setup.py lists the modules).
    assert {
        path.relative_to(package.parent).with_name(path.name.partition(".")[0]).as_posix()
        for path in package.rglob("*.so")
    } == {f"proxy/{SHARED_LIBRARY}", *(module.removesuffix(".py") for module in COMPILED_MODULES)}
    # The venv must not lean on the source tree (as an editable install would).
    shutil.rmtree(source)
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}

    version = subprocess.run(
        [str(executable), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=environment,
    )
    assert version.returncode == 0, version.stdout + version.stderr
    assert proxy.__version__ in version.stdout + version.stderr

    config = stub_config(config_document(render_kustomization(OVERLAY)), tmp_path / "root")
    check = subprocess.run(
        [str(executable), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=environment,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "inventory" in check.stdout
    assert "payments" in check.stdout
    assert "stub-credential-for-tests" not in check.stdout + check.stderr


# ---------------------------------------------------------------------------
# Rendering and schema validation
# ---------------------------------------------------------------------------


def test_overlay_changes_namespace_image_labels_and_replicas(
    base: list[Manifest], overlay: list[Manifest]
) -> None:
    assert {(m["kind"], m["metadata"]["name"]) for m in base} == {
        (m["kind"], m["metadata"]["name"]) for m in overlay
    }
    assert all(m["metadata"]["namespace"] == "orders" for m in overlay)
    assert all(m["metadata"]["labels"]["app.kubernetes.io/part-of"] == "orders" for m in overlay)
    assert find(overlay, "Deployment")["spec"]["replicas"] == 3
    sidecar = container(pod_spec(overlay), SIDECAR)
    assert sidecar["image"] == f"registry.example.com/platform/token-proxy:{proxy.__version__}"
    # Selectors stay as in the base: changing them would orphan running ReplicaSets.
    assert (
        find(overlay, "Deployment")["spec"]["selector"]
        == find(base, "Deployment")["spec"]["selector"]
    )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_rendering_agrees_with_kubectl_kustomize(directory: Path) -> None:
    kubectl = tools.kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendering checked by the Python reader only")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    def key(m: Manifest) -> tuple[str, str]:
        return m["kind"], m["metadata"]["name"]

    theirs = sorted((m for m in yaml.safe_load_all(result.stdout) if m), key=key)
    ours = sorted(render_kustomization(directory), key=key)
    assert [key(m) for m in ours] == [key(m) for m in theirs]
    for mine, kubectls in zip(ours, theirs, strict=True):
        assert mine == kubectls, f"{key(mine)} differs from kubectl kustomize"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_manifests_validate_against_kubernetes_schemas(
    directory: Path, kubernetes_version: str
) -> None:
    validator = tools.kubernetes_validate()
    if kubernetes_version == "latest":
        kubernetes_version = validator.latest_version()
    validated = []
    for manifest in render_kustomization(directory):
        try:
            # strict: unknown fields (typos such as `readOnlyRootFileSystem`) are errors.
            validator.validate(manifest, kubernetes_version, strict=True)
        except validator.SchemaNotFoundError:
            assert manifest["apiVersion"] == "monitoring.coreos.com/v1", manifest["kind"]
            continue
        except validator.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            raise AssertionError(
                f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {error.message}"
            ) from None
        validated.append(manifest["kind"])
    expected = ["ConfigMap", "Deployment", "Secret", "ServiceAccount"]
    if directory == FLEET_CACHE_OVERLAY:
        # Its Valkey (Deployment, Service), the NetworkPolicy and the cache's Secret.
        expected += ["Deployment", "NetworkPolicy", "Secret", "Service"]
    assert sorted(validated) == sorted(expected)


def test_prometheus_operator_resources_are_well_formed(overlay: list[Manifest]) -> None:
    podmonitor = find(overlay, "PodMonitor")
    rule = find(overlay, "PrometheusRule")
    for manifest in (podmonitor, rule):
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    spec = pod_spec(overlay)
    template_labels = find(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items(), "the PodMonitor selects no pod"
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    admin_ports = {p["name"]: p["containerPort"] for p in container(spec, SIDECAR)["ports"]}
    admin_port = port_of(config_document(overlay)["admin_listen"])
    assert admin_ports[endpoint["port"]] == admin_port
    assert endpoint["path"] == "/metrics"
    # The alert rules select job="token-proxy": the PodMonitor must produce that job.
    assert {"targetLabel": "job", "replacement": "token-proxy"} in endpoint["relabelings"]
    groups = rule["spec"]["groups"]
    assert groups
    for group in groups:
        assert group["name"]
        assert group["rules"]
    for group in groups:
        for alerting in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= alerting.keys()


# ---------------------------------------------------------------------------
# The pod: native sidecar, probes, proxy environment, mounts, security
# ---------------------------------------------------------------------------


def test_token_proxy_is_a_native_sidecar_that_starts_first(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    init_containers = spec["initContainers"]
    assert init_containers[0]["name"] == SIDECAR, "the proxy must start before anything else"
    assert init_containers[0]["restartPolicy"] == "Always"
    assert SIDECAR not in [c["name"] for c in spec["containers"]]
    assert [c["name"] for c in spec["containers"]] == [APP]
    # The startupProbe gates the app's start on the proxy being ready (tokens in hand).
    assert init_containers[0]["startupProbe"]["httpGet"]["path"] == "/readyz"


def test_sidecar_probes_use_the_admin_endpoints(overlay: list[Manifest]) -> None:
    sidecar = container(pod_spec(overlay), SIDECAR)
    admin_port = port_of(config_document(overlay)["admin_listen"])
    named_ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    expected_paths = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/readyz",
    }
    for probe_name, path in expected_paths.items():
        probe = sidecar[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        port = probe["port"]
        assert (named_ports[port] if isinstance(port, str) else port) == admin_port, probe_name
    # Loopback is not reachable by the kubelet: the admin port must listen on all interfaces.
    assert config_document(overlay)["admin_listen"].startswith("0.0.0.0:")
    startup = sidecar["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "too short to get tokens"


def test_sidecar_runs_the_config_from_the_configmap(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    sidecar = container(spec, SIDECAR)
    args = sidecar["args"]
    config_path = args[args.index("--config") + 1]
    mount = mount_for(sidecar, config_path)
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    assert mount.get("readOnly") is True
    configmap_volume = volume(spec, mount["name"])["configMap"]
    assert configmap_volume["name"] == "token-proxy-config"
    assert config_path == f"{mount['mountPath']}/{CONFIG_KEY}"
    assert config_path == "/etc/token-proxy/config.yaml"  # also the image's TOKEN_PROXY_CONFIG
    assert sidecar["image"].rsplit(":", 1)[1] == proxy.__version__


def test_every_file_the_config_names_is_mounted(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    sidecar = container(spec, SIDECAR)
    document = config_document(overlay)
    paths = dict(config_file_paths(document))
    assert paths, "the example config names no files"
    secret = find(overlay, "Secret", "token-proxy-client-secrets")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for key_path, file_path in paths.items():
        mount = mount_for(sidecar, file_path)
        source = volume(spec, mount["name"])
        relative = file_path[len(mount["mountPath"].rstrip("/")) + 1 :]
        if key_path.endswith("write_ca_cert_to"):
            assert "emptyDir" in source, f"{key_path} must be written to a shared emptyDir"
            assert not mount.get("readOnly", False)
        elif "secret" in source:
            items = {item["path"]: item["key"] for item in source["secret"]["items"]}
            assert source["secret"]["secretName"] == secret["metadata"]["name"]
            assert items[relative] in secret_keys, f"{key_path}: no such key in the Secret"
            assert mount.get("readOnly") is True
        elif "projected" in source:
            (projected,) = source["projected"]["sources"]
            token = projected["serviceAccountToken"]
            assert token["path"] == relative, key_path
            assert token["audience"], "a workload-identity token needs an explicit audience"
            assert key_path.endswith("client_assertion_file")
            assert mount.get("readOnly") is True
        elif "configMap" not in source:
            raise AssertionError(f"{key_path}: unexpected volume {source}")


def test_client_secrets_reach_only_the_sidecar(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v or "projected" in v}
    assert secret_volumes
    app_mounts = {m["name"] for m in container(spec, APP).get("volumeMounts", [])}
    assert not secret_volumes & app_mounts
    for name in secret_volumes:
        source = volume(spec, name)
        mode = (source.get("secret") or source.get("projected") or {}).get("defaultMode")
        assert mode is not None, f"{name} needs an explicit defaultMode"
        assert mode & 0o007 == 0, f"{name} must not be world-readable"
    # The group that may read them (mode 0440) is the sidecar's.
    assert (
        spec["securityContext"]["fsGroup"]
        == container(spec, SIDECAR)["securityContext"]["runAsGroup"]
    )


def test_emptydir_only_carries_the_ca_certificate_to_the_app(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    empty_dirs = [v for v in spec["volumes"] if "emptyDir" in v]
    assert len(empty_dirs) == 1
    (shared,) = empty_dirs
    ca_path = config_document(overlay)["tls_intercept"]["write_ca_cert_to"]
    assert mount_for(container(spec, SIDECAR), ca_path)["name"] == shared["name"]
    app_mount = mount_for(container(spec, APP), ca_path)
    assert app_mount["name"] == shared["name"]
    assert app_mount.get("readOnly") is True


@pytest.mark.parametrize("name", [SIDECAR, APP])
def test_containers_run_with_a_restrictive_security_context(
    overlay: list[Manifest], name: str
) -> None:
    spec = pod_spec(overlay)
    context = container(spec, name)["securityContext"]
    assert context["runAsNonRoot"] is True
    for identity in ("runAsUser", "runAsGroup"):
        assert isinstance(context[identity], int), identity
        assert context[identity] != 0, identity
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert "privileged" not in context or context["privileged"] is False
    pod_context = spec["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("hostNetwork", False) is False


def test_sidecar_user_is_the_image_user(overlay: list[Manifest]) -> None:
    (user,) = [args for keyword, args in dockerfile_stages()[-1] if keyword == "USER"]
    uid, _, gid = user.partition(":")
    context = container(pod_spec(overlay), SIDECAR)["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))


@pytest.mark.parametrize("name", [SIDECAR, APP])
def test_containers_declare_resources(overlay: list[Manifest], name: str) -> None:
    resources = container(pod_spec(overlay), name)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def _no_proxy_matches(host: str, entries: list[str]) -> bool:
    """Whether any NO_PROXY entry exempts `host`, in the most generous reading of
    curl, Go and Python (suffix match with or without the dot, CIDR for IP literals)."""
    host = host.lower().split(":")[0]
    for entry in entries:
        entry = entry.lower()
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry):
                    return True
            except ValueError:
                pass
            continue
        bare = entry.lstrip(".")
        if host == bare or host.endswith("." + bare):
            return True
    return False


def test_app_sends_its_traffic_through_the_proxy(overlay: list[Manifest]) -> None:
    spec = pod_spec(overlay)
    env = env_of(container(spec, APP))
    document = config_document(overlay)
    listen = document["listen"]
    assert listen.startswith("127.0.0.1:"), "the proxy port must stay on loopback"
    proxy_url = f"http://127.0.0.1:{port_of(listen)}"
    for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        assert env[variable] == proxy_url, variable
    assert env["NO_PROXY"] == env["no_proxy"]
    entries = env["NO_PROXY"].split(",")
    assert {"localhost", "127.0.0.1", ".svc", ".cluster.local"} <= set(entries)
    networks = [ipaddress.ip_network(e) for e in entries if "/" in e]
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"):
        assert ipaddress.ip_network(private) in networks
    # The cluster's own names bypass the proxy...
    for in_cluster in ("inventory.orders.svc", "kubernetes.default.svc.cluster.local", "10.96.0.1"):
        assert _no_proxy_matches(in_cluster, entries), in_cluster
    # ...but no configured upstream does, or its requests would leave without a token.
    for name, upstream in document["upstreams"].items():
        for host in upstream["match"]["hosts"]:
            assert not _no_proxy_matches(host, entries), f"{name}: {host} bypasses the proxy"


def test_shutdown_fits_in_the_termination_grace_period(
    overlay: list[Manifest], tmp_path: Path
) -> None:
    config = _load_example_config(overlay, tmp_path)
    grace = pod_spec(overlay)["terminationGracePeriodSeconds"]
    # The app stops first, then the sidecar: the pod's budget must hold the proxy's
    # whole drain with time to spare for the app's.
    assert grace >= config.shutdown_grace_period + 5
    assert grace - config.shutdown_grace_period >= 15, "little time left for the app to drain"


def _load_example_config(overlay: list[Manifest], tmp_path: Path) -> Any:
    path = stub_config(config_document(overlay), tmp_path)
    try:
        return load_config(path)
    except NotImplementedError:
        pytest.skip("proxy.config.load_config is not implemented yet")


def test_configmap_config_loads_with_the_real_loader(
    overlay: list[Manifest], tmp_path: Path
) -> None:
    config = _load_example_config(overlay, tmp_path)
    assert [u.name for u in config.upstreams] == ["inventory", "payments"]
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 15080)
    assert (config.admin_listen.host, config.admin_listen.port) == ("0.0.0.0", 15090)
    inventory = config.upstream("inventory").token
    assert inventory.client_secret_file == tmp_path / "var/run/secrets/inventory/client-secret"
    assert inventory.auth_method == "client_secret_basic"
    payments = config.upstream("payments").token
    assert payments.auth_method == "private_key_jwt"
    assert payments.client_assertion_file == tmp_path / "var/run/secrets/tokens/payments/token"
    assert config.tls_intercept is not None
    assert config.tls_intercept.ca_key_file is None, "the example generates its CA in memory"
