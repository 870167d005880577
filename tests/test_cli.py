"""Tests for the `token-proxy` command line, run as a real process (`python -m proxy`).

What an operator relies on: `check` prints a summary without secrets and exits 0; a
bad config is exactly one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from proxy.cli import main, summary
from proxy.config import ProxyConfig, RedisConfig, TokenCacheConfig

REPO = Path(__file__).resolve().parent.parent
SECRET = "cli-Sup3r-Secret-Value"

GOOD_CONFIG = """\
listen: 127.0.0.1:15080
admin_listen: 0.0.0.0:15090
unknown_hosts: deny
upstreams:
  inventory:
    match:
      hosts: [inventory.internal, "inventory.internal:8443"]
      path_prefix: /api
    url: https://inventory.internal
    listen: 127.0.0.1:18081
    token:
      token_url: https://auth.example.com/oauth/token
      client_id: order-service
      client_secret_file: {secret_file}
      scope: read:inventory write:orders
      dpop: {{alg: EdDSA}}
  billing:
    match:
      hosts: [billing.internal]
    http2: "off"
    header: X-Api-Token
    overwrite: false
    required: false
    token:
      issuer: https://auth.example.com/realms/billing
      client_id: billing-client
      client_secret: ${{BILLING_SECRET}}
      auth_method: client_secret_post
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "TOKEN_PROXY_CONFIG"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SECRET + "-from-file\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(GOOD_CONFIG.format(secret_file=secret_file))
    return path


def test_check_prints_a_summary_without_secrets(good_config: Path) -> None:
    result = run_cli("check", "--config", str(good_config), env={"BILLING_SECRET": SECRET})
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == f"{good_config}: OK"
    assert lines[1] == (
        "listen: 127.0.0.1:15080  admin_listen: 0.0.0.0:15090  unknown_hosts: deny  "
        "tls_intercept: off"
    )
    assert lines[2:5] == ["token_cache: off", "token_endpoint_concurrency: 8", "upstreams: 2"]
    secret_file = good_config.parent / "client-secret"
    assert lines[5:] == [
        "upstream inventory:",
        "  hosts: inventory.internal, inventory.internal:8443",
        "  path_prefix: /api",
        "  url: https://inventory.internal",
        "  listen: 127.0.0.1:18081",
        "  token_url: https://auth.example.com/oauth/token",
        "  grant: client_credentials",
        "  client_id: order-service",
        "  auth_method: client_secret_basic",
        f"  client_secret_file: {secret_file}",
        "  scope: read:inventory write:orders",
        "  dpop: EdDSA  key: (generated at start-up)",
        "  required: true",
        "  overwrite: true",
        "  header: Authorization",
        "  http2: auto",
        "upstream billing:",
        "  hosts: billing.internal",
        "  path_prefix: (any)",
        "  url: (the requested host)",
        "  listen: (none)",
        "  issuer: https://auth.example.com/realms/billing",
        "  grant: client_credentials",
        "  client_id: billing-client",
        "  auth_method: client_secret_post",
        "  client_secret: (set)",
        "  scope: (none)",
        "  required: false",
        "  overwrite: false",
        "  header: X-Api-Token",
        "  http2: off",
    ]
    assert SECRET not in result.stdout


def test_config_file_from_the_environment(good_config: Path) -> None:
    result = run_cli(
        "check", env={"TOKEN_PROXY_CONFIG": str(good_config), "BILLING_SECRET": SECRET}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{good_config}: OK"


def test_command_line_config_wins_over_the_environment(good_config: Path, tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "--config",
        str(good_config),
        env={"TOKEN_PROXY_CONFIG": str(tmp_path / "nope.yaml"), "BILLING_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_config_is_one_line_and_exit_2(command: str, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "upstreams:\n"
        "  inventory:\n"
        "    match: {hosts: [inventory.internal]}\n"
        "    token:\n"
        "      token_url: https://auth.example.com/token\n"
        f"      client_secret: {SECRET}\n"
    )
    result = run_cli(command, "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"token-proxy: {path}: upstreams.inventory.token.client_id: missing"
    ]
    assert result.stdout == ""
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    ("config_text", "problem"),
    [
        (None, "cannot read the config file: No such file or directory"),
        ("listen: [\n", "invalid YAML at line 2, column 1: expected the node content, but found"),
        ("lissen: 127.0.0.1:1\n", "lissen: unknown key (did you mean listen?)"),
        (
            "upstreams:\n  a:\n    match: {hosts: [a]}\n    token: {token_url: https://a.example,"
            " client_id: c, client_secret: '${UNSET_FOR_CLI_TEST}'}\n",
            "upstreams.a.token.client_secret: environment variable UNSET_FOR_CLI_TEST is not set",
        ),
    ],
    ids=["missing-file", "yaml-syntax", "unknown-key", "unset-variable"],
)
def test_config_errors_never_print_a_traceback(
    config_text: str | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    if config_text is not None:
        path.write_text(config_text)
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"token-proxy: {path}: {problem}")
    assert "Traceback" not in result.stderr


def test_no_config_anywhere_is_one_line_and_exit_2() -> None:
    result = run_cli("check")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "token-proxy: no configuration file: pass --config FILE or set TOKEN_PROXY_CONFIG"
    ]


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"token-proxy {__version__}")


def test_installed_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).parent / "token-proxy"
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"token-proxy {__version__}")


def test_main_returns_exit_codes_instead_of_raising(
    good_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKEN_PROXY_CONFIG", raising=False)
    monkeypatch.setenv("BILLING_SECRET", SECRET)
    assert main(["--version"]) == 0
    assert main(["check", "--config", str(good_config)]) == 0
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    captured = capsys.readouterr()
    assert f"token-proxy {__version__}" in captured.out
    assert SECRET not in captured.out + captured.err


def test_check_describes_tls_interception(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(f"tls_intercept:\n  write_ca_cert_to: {tmp_path}/ca.crt\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "listen: 127.0.0.1:15080  admin_listen: 0.0.0.0:15090  unknown_hosts: passthrough  "
        f"tls_intercept: on, generated CA, CA certificate written to {tmp_path}/ca.crt",
        "token_cache: off",
        "token_endpoint_concurrency: 8",
        "upstreams: 0",
    ]


def test_check_loads_the_interception_ca_files(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    ca.private_key_pem.write_to_path(str(tmp_path / "ca.key"))
    path = tmp_path / "proxy.yaml"
    body = f"tls_intercept:\n  ca_cert_file: {tmp_path}/ca.crt\n  ca_key_file: {{key}}\n"
    path.write_text(body.format(key=tmp_path / "ca.key"))
    assert run_cli("check", "--config", str(path)).returncode == 0

    (tmp_path / "wrong.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    path.write_text(body.format(key=tmp_path / "wrong.key"))
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "tls_intercept.ca_key_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_receives_its_own_arguments() -> None:
    # `--help` is the demo's option, not ours: it must reach proxy.demo untouched.
    result = run_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert " demo " in result.stdout.splitlines()[0]
    assert "run a self-contained demonstration" not in result.stdout  # not our --help


def test_check_warns_about_short_client_secrets(
    good_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short secret is easy to guess: `check` says so, on stderr, and still exits 0."""
    monkeypatch.delenv("TOKEN_PROXY_CONFIG", raising=False)
    monkeypatch.setenv("BILLING_SECRET", "proxy")
    (good_config.parent / "client-secret").write_text("s3cr3t\n")
    assert main(["check", "--config", str(good_config)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{good_config}: OK"
    assert captured.err.splitlines() == [
        f"token-proxy: warning: {good_config}: upstreams.{name}.token.{key}: the client "
        "secret is shorter than 8 characters, which is easy to guess"
        for name, key in (("inventory", "client_secret_file"), ("billing", "client_secret"))
    ]
    assert "s3cr3t" not in captured.out + captured.err
    assert "proxy" not in captured.err.replace("token-proxy", "").replace("/proxy.yaml", "")

    monkeypatch.setenv("BILLING_SECRET", SECRET)
    (good_config.parent / "client-secret").write_text(SECRET + "\n")
    assert main(["check", "--config", str(good_config)]) == 0
    assert capsys.readouterr().err == ""


CACHE_KEY = "c2hhcmVkLWJ5LWV2ZXJ5LXJlcGxpY2Etb2YtdGhlLWZsZWV0IQ=="  # over 32 bytes
TOKEN_CACHE = """\
token_cache:
  redis:
    url: rediss://redis.token-proxy.svc:6380/2
    username: token-proxy
    password_file: {directory}/redis-password
  encryption_key_file: {directory}/cache-key
  key_prefix: fleet-a
  lock_timeout: 2500ms
token_endpoint_concurrency: 4
"""


def test_check_summarises_the_token_cache(
    good_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis URL, key prefix, lock timeout and the upstreams that keep their own tokens."""
    monkeypatch.delenv("TOKEN_PROXY_CONFIG", raising=False)
    monkeypatch.setenv("BILLING_SECRET", SECRET)
    directory = good_config.parent
    (directory / "redis-password").write_text(SECRET + "-redis\n")
    (directory / "cache-key").write_text(CACHE_KEY + "\n")
    text = TOKEN_CACHE.format(directory=directory) + good_config.read_text().replace(
        "      auth_method: client_secret_post\n",
        "      auth_method: client_secret_post\n      cache: local\n",
    )
    good_config.write_text(text)
    assert main(["check", "--config", str(good_config)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[2:5] == [
        "token_cache: rediss://redis.token-proxy.svc:6380/2  key_prefix: fleet-a  "
        "lock_timeout: 2.5s  local upstreams: billing",
        "token_endpoint_concurrency: 4",
        "upstreams: 2",
    ]
    for secret in (SECRET, CACHE_KEY):
        assert secret not in captured.out + captured.err


def test_check_names_every_upstream_that_keeps_its_token_local() -> None:
    cache = TokenCacheConfig(
        redis=RedisConfig(url="redis://redis.internal"), encryption_key_file=Path("/k")
    )
    config = ProxyConfig(upstreams=(), token_cache=cache)
    assert summary(config).splitlines()[2] == (
        "token_cache: redis://redis.internal  key_prefix: token-proxy  lock_timeout: 10s  "
        "local upstreams: (none)"
    )


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@redis.internal:6379/0",
        f"rediss://token-proxy:{SECRET}@redis.internal/0",
        f"redis://{SECRET}@redis.internal",
    ],
    ids=["password", "user-and-password", "user"],
)
def test_the_summary_never_shows_redis_credentials(url: str) -> None:
    """The loader refuses credentials in the URL; the summary drops them regardless."""
    cache = TokenCacheConfig(redis=RedisConfig(url=url), encryption_key_file=Path("/k"))
    line = summary(ProxyConfig(upstreams=(), token_cache=cache)).splitlines()[2]
    assert SECRET not in line
    assert line.startswith(f"token_cache: {url.partition('://')[0]}://redis.internal")


def test_a_short_cache_key_is_one_line_and_exit_2(good_config: Path) -> None:
    directory = good_config.parent
    (directory / "redis-password").write_text("p\n")
    (directory / "cache-key").write_text("too-short\n")
    good_config.write_text(TOKEN_CACHE.format(directory=directory) + good_config.read_text())
    result = run_cli("check", "--config", str(good_config), env={"BILLING_SECRET": SECRET})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"token-proxy: {good_config}: token_cache.encryption_key_file: the key is shorter "
        "than 32 bytes (make one with: openssl rand -base64 32)"
    ]
    assert "too-short" not in result.stderr


# -- grants beyond client credentials -------------------------------------------------------

SUBJECT_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmVk"
GRANT_CONFIG = """\
upstreams:
  cloud:
    match: {{hosts: [storage.example.com]}}
    token:
      grant: token_exchange
      token_url: https://sts.example.com/v1/token
      subject_token_file: {directory}/sts-token
      audience: //iam.example.com/pools/k8s/providers/cluster-1
      scope: cloud-platform
  delegated:
    match: {{hosts: [orders.example.com]}}
    token:
      grant: token_exchange
      token_url: https://auth.example.com/token
      client_id: order-service
      client_secret_file: {directory}/client-secret
      subject_token_file: {directory}/sts-token
      subject_token_type: urn:ietf:params:oauth:token-type:access_token
      actor_token_file: {directory}/actor-token
      actor_token_type: urn:ietf:params:oauth:token-type:jwt
      requested_token_type: urn:ietf:params:oauth:token-type:jwt
  partner:
    match: {{hosts: [partner.example.com]}}
    token:
      grant: jwt_bearer
      token_url: https://partner.example.com/token
      client_id: order-service
      assertion_file: {directory}/assertion
  signed:
    match: {{hosts: [signed.example.com]}}
    token:
      grant: jwt_bearer
      token_url: https://signed.example.com/token
      client_id: order-service
      private_key_file: {directory}/key.pem
      key_id: k1
"""


@pytest.fixture
def grant_config(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for name, content in (
        ("sts-token", SUBJECT_TOKEN + "\n"),
        ("actor-token", SUBJECT_TOKEN + "-actor\n"),
        ("assertion", SUBJECT_TOKEN + "-assertion\n"),
        ("client-secret", SECRET + "\n"),
    ):
        (tmp_path / name).write_text(content)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = tmp_path / "grants.yaml"
    path.write_text(GRANT_CONFIG.format(directory=tmp_path))
    return path


def _upstream_rows(stdout: str, name: str) -> dict[str, str]:
    lines = stdout.splitlines()
    start = lines.index(f"upstream {name}:") + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition(": ")
        rows[key] = value
    return rows


def test_check_shows_each_grant_and_never_its_tokens(grant_config: Path) -> None:
    result = run_cli("check", "--config", str(grant_config))
    assert (result.returncode, result.stderr) == (0, "")
    directory = grant_config.parent
    cloud = _upstream_rows(result.stdout, "cloud")
    assert (cloud["grant"], cloud["client_id"], cloud["auth_method"]) == (
        "token_exchange",
        "(none)",
        "none",
    )
    assert cloud["subject_token_file"] == f"{directory}/sts-token"
    assert cloud["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert cloud["requested_token_type"] == "(the server's choice)"
    delegated = _upstream_rows(result.stdout, "delegated")
    assert delegated["auth_method"] == "client_secret_basic"
    assert delegated["actor_token_file"] == f"{directory}/actor-token"
    assert delegated["actor_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert delegated["requested_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    partner = _upstream_rows(result.stdout, "partner")
    assert (partner["grant"], partner["auth_method"]) == ("jwt_bearer", "none")
    assert partner["assertion_file"] == f"{directory}/assertion"
    signed = _upstream_rows(result.stdout, "signed")
    assert (signed["grant"], signed["private_key_file"]) == ("jwt_bearer", f"{directory}/key.pem")
    assert SUBJECT_TOKEN not in result.stdout
    assert SECRET not in result.stdout


GRANT_MISTAKES = [
    (
        "cloud",
        "      subject_token_file: {directory}/sts-token\n",
        "",
        "subject_token_file",
        "missing (grant token_exchange needs it)",
    ),
    (
        "cloud",
        "      grant: token_exchange\n      token_url: https://sts.example.com/v1/token\n",
        "      grant: token_exchange\n      token_url: https://sts.example.com/v1/token\n"
        "      actor_token_file: {directory}/actor-token\n",
        "actor_token_type",
        "missing (set both actor_token_file and it, or neither)",
    ),
    (
        "cloud",
        "      scope: cloud-platform\n",
        "      scope: cloud-platform\n"
        "      requested_token_type: urn:ietf:params:oauth:token-type:refresh_token\n",
        "requested_token_type",
        "'urn:ietf:params:oauth:token-type:refresh_token' cannot be sent as a bearer token: "
        "request urn:ietf:params:oauth:token-type:access_token or "
        "urn:ietf:params:oauth:token-type:jwt",
    ),
    (
        "cloud",
        "      grant: token_exchange\n      token_url: https://sts.example.com/v1/token\n",
        "      grant: token-exchange\n      token_url: https://sts.example.com/v1/token\n",
        "grant",
        "'token-exchange': must be one of client_credentials, token_exchange, jwt_bearer "
        "(did you mean token_exchange?)",
    ),
    (
        "partner",
        "      assertion_file: {directory}/assertion\n",
        "",
        "assertion_file",
        "missing (grant jwt_bearer needs assertion_file or private_key_file)",
    ),
    (
        "partner",
        "      assertion_file: {directory}/assertion\n",
        "      assertion_file: {directory}/assertion\n"
        "      subject_token_file: {directory}/sts-token\n",
        "subject_token_file",
        "not used with grant jwt_bearer",
    ),
    (
        "signed",
        "      key_id: k1\n",
        "      key_id: k1\n      auth_method: private_key_jwt\n",
        "auth_method",
        "private_key_jwt is not used with grant jwt_bearer: private_key_file signs the "
        "grant's assertion; authenticate the client with a secret, a certificate or none",
    ),
    (
        "partner",
        "      grant: jwt_bearer\n",
        "      auth_method: none\n",  # the grant forgotten: client credentials
        "assertion_file",
        "not used with grant client_credentials",
    ),
]


@pytest.mark.parametrize(
    ("upstream", "old", "new", "key", "problem"),
    GRANT_MISTAKES,
    ids=[f"{mistake[0]}-{mistake[3]}-{index}" for index, mistake in enumerate(GRANT_MISTAKES)],
)
def test_each_grant_mistake_is_one_line_and_exit_2(
    grant_config: Path, upstream: str, old: str, new: str, key: str, problem: str
) -> None:
    directory = grant_config.parent
    text = grant_config.read_text()
    section = f"  {upstream}:\n"
    head, _, rest = text.partition(section)
    old, new = old.format(directory=directory), new.format(directory=directory)
    assert old in rest
    grant_config.write_text(head + section + rest.replace(old, new, 1))
    result = run_cli("check", "--config", str(grant_config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"token-proxy: {grant_config}: upstreams.{upstream}.token.{key}: {problem}"
    ]
    assert result.stdout == ""
    assert SUBJECT_TOKEN not in result.stderr


def _stub_paths(text: str, root: Path) -> str:
    """`text` with its absolute /var/run and /shared paths moved under `root`, the files
    made (a token in each) and the directories created, as a pod would have them."""
    for found in sorted(set(re.findall(r"(?<![\w/])/(?:var/run|shared)/[\w./-]+", text))):
        target = root / found.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not found.startswith("/shared/"):
            target.write_text(SUBJECT_TOKEN + "\n")
        text = text.replace(found, str(target))
    return text


def test_the_readmes_federation_example_passes_check(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    _, marker, rest = readme.partition("<!-- federation-example -->\n```yaml\n")
    assert marker, "README.md lost its federation example"
    example = rest.partition("```")[0]
    assert "grant: token_exchange" in example
    path = tmp_path / "federation.yaml"
    path.write_text(_stub_paths(example, tmp_path))
    result = run_cli("check", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    rows = _upstream_rows(result.stdout, "storage")
    assert (rows["grant"], rows["auth_method"], rows["client_id"]) == (
        "token_exchange",
        "none",
        "(none)",
    )
    assert rows["audience"] == "//iam.example.com/pools/k8s/providers/cluster-1"


def test_the_workload_identity_overlays_config_passes_check(tmp_path: Path) -> None:
    kustomization = yaml.safe_load(
        (REPO / "deploy/overlays/workload-identity/kustomization.yaml").read_text()
    )
    [config_patch] = [
        patch for patch in kustomization["patches"] if patch["target"]["kind"] == "ConfigMap"
    ]
    [operation] = yaml.safe_load(config_patch["patch"])
    assert operation["path"] == "/data/config.yaml"
    path = tmp_path / "config.yaml"
    path.write_text(_stub_paths(operation["value"], tmp_path))
    result = run_cli("check", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    rows = _upstream_rows(result.stdout, "storage")
    assert (rows["grant"], rows["auth_method"]) == ("token_exchange", "none")
    assert rows["subject_token_file"] == str(tmp_path / "var/run/secrets/tokens/sts/token")
