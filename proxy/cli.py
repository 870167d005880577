"""The `token-proxy` command line: `run`, `check`, `demo` and `--version`.

Thin by design: it finds the config file (`--config`, else `TOKEN_PROXY_CONFIG`),
loads it, and either prints a summary and any warnings (`check`) or hands it to
`proxy.app.run_proxy` (`run`). A configuration problem is one line on stderr and exit
code 2, never a traceback. `python -m proxy` runs the same `main`.
"""

from __future__ import annotations

import argparse
import os
import sys

from proxy import __version__
from proxy.config import (
    ConfigError,
    ProxyConfig,
    UpstreamConfig,
    load_config,
    short_secret_warnings,
)

PROG = "token-proxy"
CONFIG_ENV = "TOKEN_PROXY_CONFIG"
EXIT_USAGE = 2  # bad command line or bad configuration, as argparse uses for usage errors


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    # `demo` takes its own options, which argparse would try to parse as ours.
    if args[:1] == ["demo"]:
        return _demo(args[1:])
    parser = _parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_request:  # --help, --version, usage errors
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    if options.command is None:
        parser.print_usage(sys.stderr)
        return _fail("a command is required: run, check or demo")
    config_file = options.config or os.environ.get(CONFIG_ENV)
    if not config_file:
        return _fail(f"no configuration file: pass --config FILE or set {CONFIG_ENV}")
    try:
        config = load_config(config_file)
    except ConfigError as error:
        return _fail(str(error))
    if options.command == "check":
        intercept = config.tls_intercept
        if intercept is not None and intercept.ca_cert_file is not None:
            from proxy.tls.local_ca import AuthorityError, CertificateAuthority

            assert intercept.ca_key_file is not None  # both or neither (config validation)
            try:
                CertificateAuthority.load(intercept.ca_cert_file, intercept.ca_key_file)
            except AuthorityError as error:
                return _fail(f"{config.source}: tls_intercept.{error.key}: {error.problem}")
        print(summary(config))
        for warning in short_secret_warnings(config):
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        return 0
    # Imported here so `check` works without the server's dependencies loaded.
    from proxy.app import run_proxy

    return run_proxy(config)


def summary(config: ProxyConfig) -> str:
    """What `check` prints: the listeners, the token cache and each upstream, never a secret."""
    lines = [
        f"{config.source}: OK",
        f"listen: {config.listen}  admin_listen: {config.admin_listen}  "
        f"unknown_hosts: {config.unknown_hosts}  tls_intercept: {_describe_intercept(config)}",
        f"token_cache: {_describe_token_cache(config)}",
        f"token_endpoint_concurrency: {config.token_endpoint_concurrency}",
        f"upstreams: {len(config.upstreams)}",
    ]
    for upstream in config.upstreams:
        lines.append(f"upstream {upstream.name}:")
        lines.extend(f"  {key}: {value}" for key, value in _describe_upstream(upstream))
    return "\n".join(lines)


def _describe_intercept(config: ProxyConfig) -> str:
    intercept = config.tls_intercept
    if intercept is None:
        return "off"
    text = (
        "on, generated CA" if intercept.ca_cert_file is None else f"on, CA {intercept.ca_cert_file}"
    )
    if intercept.write_ca_cert_to is not None:
        text += f", CA certificate written to {intercept.write_ca_cert_to}"
    return text


def _describe_token_cache(config: ProxyConfig) -> str:
    cache = config.token_cache
    if cache is None:
        return "off"
    local = [upstream.name for upstream in config.upstreams if upstream.token.cache == "local"]
    return (
        f"{_without_userinfo(cache.redis.url)}  key_prefix: {cache.key_prefix}  "
        f"lock_timeout: {_seconds(cache.lock_timeout)}  "
        f"local upstreams: {', '.join(local) or '(none)'}"
    )


def _without_userinfo(url: str) -> str:
    """The URL without `user:password@`: whatever the config allows, a password is never shown."""
    scheme, separator, rest = url.partition("://")
    end = next((index for index, char in enumerate(rest) if char in "/?#"), len(rest))
    return scheme + separator + rest[:end].rpartition("@")[2] + rest[end:]


def _seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _describe_upstream(upstream: UpstreamConfig) -> list[tuple[str, object]]:
    token = upstream.token
    hosts = ", ".join(
        (f"[{host.host}]" if ":" in host.host else host.host)
        + ("" if host.port is None else f":{host.port}")
        for host in upstream.match.hosts
    )
    rows: list[tuple[str, object]] = [
        ("hosts", hosts),
        ("path_prefix", upstream.match.path_prefix or "(any)"),
        ("url", upstream.url or "(the requested host)"),
        ("listen", upstream.listen or "(none)"),
    ]
    if upstream.match.methods:
        rows.insert(2, ("methods", ", ".join(upstream.match.methods)))
    if token.token_url is not None:
        rows.append(("token_url", token.token_url))
    else:
        rows.append(("issuer", token.issuer))
    rows += [
        ("grant", token.grant),
        ("client_id", token.client_id or "(none)"),
        ("auth_method", token.auth_method),
    ]
    # Where the credential lives, never what it is.
    if token.client_secret is not None:
        rows.append(("client_secret", "(set)"))
    for key, path in (
        ("client_secret_file", token.client_secret_file),
        ("private_key_file", token.private_key_file),
        ("client_assertion_file", token.client_assertion_file),
        ("client_cert_file", token.tls.client_cert_file),
        ("subject_token_file", token.subject_token_file),
        ("actor_token_file", token.actor_token_file),
        ("assertion_file", token.assertion_file),
    ):
        if path is not None:
            rows.append((key, path))
    if token.grant == "token_exchange":
        rows.append(("subject_token_type", token.subject_token_type))
        if token.actor_token_type is not None:
            rows.append(("actor_token_type", token.actor_token_type))
        rows.append(("requested_token_type", token.requested_token_type or "(the server's choice)"))
    rows.append(("scope", " ".join(token.scope) or "(none)"))
    if token.audience is not None:
        rows.append(("audience", token.audience))
    if token.resource:
        rows.append(("resource", " ".join(token.resource)))
    if token.dpop is not None:
        key_file = token.dpop.key_file or "(generated at start-up)"
        rows.append(("dpop", f"{token.dpop.alg}  key: {key_file}"))
    rows += [
        ("required", _yes_no(upstream.required)),
        ("overwrite", _yes_no(upstream.overwrite)),
        ("header", upstream.header),
        ("http2", upstream.http2),
    ]
    return rows


def _yes_no(flag: bool) -> str:
    return "true" if flag else "false"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sidecar proxy that adds OAuth 2.0 access tokens "
        "to a service's outbound requests.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config_help = f"the YAML configuration file (default: ${CONFIG_ENV})"
    run = commands.add_parser("run", help="run the sidecar")
    run.add_argument("--config", metavar="FILE", help=config_help)
    check = commands.add_parser("check", help="validate a configuration and summarise it")
    check.add_argument("--config", metavar="FILE", help=config_help)
    # Listed for --help only: main() hands `demo ...` over before argparse sees it.
    commands.add_parser("demo", help="run a self-contained demonstration", add_help=False)
    return parser


def _demo(args: list[str]) -> int:
    from proxy.demo import main as demo_main

    return demo_main(args)


def _fail(message: str) -> int:
    # One line, whatever the message holds: log collectors split on newlines.
    print(f"{PROG}: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_USAGE
