"""The servers of one benchmark run, started as real processes on 127.0.0.1.

`Stack` starts, in this order: the upload sink, the origin (nginx), the token
endpoint, the nginx baseline, the bare reference proxy (`bench/bare_proxy.py`) and
token-proxy (`python -m proxy run --config <yaml>`), each pinned to its core, and
describes the `Target`s a load can be aimed at.

token-proxy gets three upstreams, each using its own name as client id so the token
endpoint can count fetches per upstream:

* `bench-reverse`: its own `listen` port, `url` the origin (reverse mode);
* `bench-forward`: matches `origin.bench` on the forward-proxy port, `url` the origin
  (forward mode: wrk sends `GET http://origin.bench/ HTTP/1.1`);
* `bench-upload`: the sink, by its own port or as `sink.bench` on the forward port.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import nginx
from bench.processes import ProcessGroup, free_port
from bench.procfs import descendants
from bench.wrk import Request

REPO_ROOT = Path(__file__).resolve().parent.parent
FORWARD_HOST = "origin.bench"
REVERSE_HOST = "reverse.bench"
SINK_HOST = "sink.bench"
DIRECT_TOKEN = "direct-bench-token"


@dataclass(frozen=True)
class Cores:
    """Which CPUs each side runs on (taskset lists); None everywhere on a single core."""

    under_test: str | None
    load: str | None
    origin: str | None

    @classmethod
    def for_machine(cls) -> Cores:
        count = len(os.sched_getaffinity(0))
        cpus = sorted(os.sched_getaffinity(0))
        if count < 2:
            return cls(None, None, None)
        # With only two cores the origin shares the load generator's core, so the core
        # being measured runs nothing but the proxy under test.
        origin = cpus[2] if count > 2 else cpus[1]
        return cls(str(cpus[0]), str(cpus[1]), str(origin))

    def describe(
        self, load: str = "wrk/curl", origin: str = "origin, sink and token endpoint"
    ) -> str:
        """Where each side runs, naming the load side and the origin side as `load` and
        `origin` say."""
        if self.under_test is None:
            return "not pinned (one core)"
        return (
            f"proxy under test on CPU {self.under_test}; {load} on CPU {self.load}; "
            f"{origin} on CPU {self.origin}"
        )


@dataclass(frozen=True)
class Target:
    """Something a load is aimed at: a port, what to send there, and whose CPU to count."""

    name: str
    port: int
    request: Request
    # curl's view: the URL for downloads/uploads (None: takes none) and the proxy (-x) if any.
    download_url: str
    upload_url: str | None
    curl_proxy: str | None
    pids: list[int] = field(default_factory=list)
    extra_curl_headers: tuple[str, ...] = ()


class Stack:
    """Origin, sink, token endpoint, nginx baseline and token-proxy for one run."""

    def __init__(
        self,
        group: ProcessGroup,
        workdir: Path,
        cores: Cores,
        big_file: Path,
        token_lifetime: int,
        refresh_before_expiry: int,
    ) -> None:
        self.group = group
        self.workdir = workdir
        self.cores = cores
        self.big_file = big_file
        self.token_lifetime = token_lifetime
        self.refresh_before_expiry = refresh_before_expiry
        self.origin_port = free_port()
        self.sink_port = free_port()
        self.token_port = free_port()
        self.baseline_port = free_port()
        self.bare_port = free_port()
        self.proxy_port = free_port()
        self.proxy_admin_port = free_port()
        self.reverse_port = free_port()
        self.upload_port = free_port()
        self.baseline: subprocess.Popen[bytes] | None = None
        self.bare_proxy: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        python = sys.executable
        sink = self.group.start(
            "sink",
            [python, "-m", "bench.sink", str(self.sink_port)],
            cpus=self.cores.origin,
            cwd=REPO_ROOT,
        )
        self.group.wait_for_port("sink", sink, self.sink_port)
        origin = self._start_nginx(
            "origin",
            nginx.origin_config(self.workdir, self.origin_port, self.big_file),
            self.cores.origin,
        )
        self.group.wait_for_port("origin", origin, self.origin_port)
        secret = start_token_endpoint(
            self.group, self.token_port, self.token_lifetime, self.cores.origin
        )
        self.baseline = self._start_nginx(
            "baseline",
            nginx.baseline_config(
                self.workdir, self.baseline_port, self.origin_port, self.sink_port
            ),
            self.cores.under_test,
        )
        self.group.wait_for_port("baseline", self.baseline, self.baseline_port)
        self.bare_proxy = self.group.start(
            "bare-proxy",
            [python, "-m", "bench.bare_proxy", str(self.bare_port), str(self.origin_port)],
            cpus=self.cores.under_test,
            cwd=REPO_ROOT,
        )
        self.group.wait_for_port("bare-proxy", self.bare_proxy, self.bare_port)
        self.proxy = start_token_proxy(
            self.group,
            self.workdir,
            self.proxy_config(),
            secret=secret,
            admin_port=self.proxy_admin_port,
            cpus=self.cores.under_test,
        )

    def _start_nginx(self, name: str, config: str, cpus: str | None) -> subprocess.Popen[bytes]:
        config_file = self.workdir / f"{name}.conf"
        config_file.write_text(config)
        return self.group.start(name, nginx.nginx_command(config_file, self.workdir), cpus=cpus)

    def proxy_config(self) -> dict[str, object]:
        origin = f"http://127.0.0.1:{self.origin_port}"
        sink = f"http://127.0.0.1:{self.sink_port}"

        def upstream(name: str, host: str, url: str, listen: int | None) -> dict[str, object]:
            refresh = f"{self.refresh_before_expiry}s"
            return bench_upstream(
                name, host, url, self.token_port, listen, refresh_before_expiry=refresh
            )

        upstreams = {
            "bench-reverse": upstream("bench-reverse", REVERSE_HOST, origin, self.reverse_port),
            "bench-forward": upstream("bench-forward", FORWARD_HOST, origin, None),
            "bench-upload": upstream("bench-upload", SINK_HOST, sink, self.upload_port),
        }
        return token_proxy_config(self.proxy_port, self.proxy_admin_port, upstreams)

    # -- targets -------------------------------------------------------------------

    def direct(self) -> Target:
        auth = ("Authorization", f"Bearer {DIRECT_TOKEN}")
        return Target(
            name="direct",
            port=self.origin_port,
            request=Request("/", "127.0.0.1", (auth,)),
            download_url=f"http://127.0.0.1:{self.origin_port}/big",
            upload_url=f"http://127.0.0.1:{self.sink_port}/upload",
            curl_proxy=None,
            extra_curl_headers=(f"{auth[0]}: {auth[1]}",),
        )

    def nginx(self) -> Target:
        assert self.baseline is not None
        return Target(
            name="nginx",
            port=self.baseline_port,
            request=Request("/", "127.0.0.1"),
            download_url=f"http://127.0.0.1:{self.baseline_port}/big",
            upload_url=f"http://127.0.0.1:{self.baseline_port}/upload",
            curl_proxy=None,
            pids=descendants(self.baseline.pid),
        )

    def bare(self) -> Target:
        """The bare reference proxy (`bench/bare_proxy.py`): GETs only, no uploads."""
        assert self.bare_proxy is not None
        return Target(
            name="bare",
            port=self.bare_port,
            request=Request("/", "127.0.0.1"),
            download_url=f"http://127.0.0.1:{self.bare_port}/big",
            upload_url=None,
            curl_proxy=None,
            pids=[self.bare_proxy.pid],
        )

    def tp_reverse(self) -> Target:
        assert self.proxy is not None
        return Target(
            name="tp-reverse",
            port=self.reverse_port,
            request=Request("/", REVERSE_HOST),
            download_url=f"http://127.0.0.1:{self.reverse_port}/big",
            upload_url=f"http://127.0.0.1:{self.upload_port}/upload",
            curl_proxy=None,
            pids=[self.proxy.pid],
        )

    def tp_forward(self) -> Target:
        assert self.proxy is not None
        return Target(
            name="tp-forward",
            port=self.proxy_port,
            request=Request(f"http://{FORWARD_HOST}/", FORWARD_HOST),
            download_url=f"http://{FORWARD_HOST}/big",
            upload_url=f"http://{SINK_HOST}/upload",
            curl_proxy=f"http://127.0.0.1:{self.proxy_port}",
            pids=[self.proxy.pid],
        )

    def token_counts_url(self) -> str:
        return f"http://127.0.0.1:{self.token_port}/counts"


def start_token_endpoint(group: ProcessGroup, port: int, lifetime: int, cpus: str | None) -> str:
    """`bench.token_endpoint` on `port`, issuing tokens of `lifetime` seconds; returns
    the client secret it accepts (for `start_token_proxy`, never written to disk)."""
    secret = secrets.token_urlsafe(16)
    endpoint = group.start(
        "token-endpoint",
        [sys.executable, "-m", "bench.token_endpoint", str(port), str(lifetime)],
        cpus=cpus,
        env={"BENCH_CLIENT_SECRET": secret},
        cwd=REPO_ROOT,
    )
    group.wait_for_port("token-endpoint", endpoint, port)
    return secret


def start_token_proxy(
    group: ProcessGroup,
    workdir: Path,
    config: dict[str, object],
    *,
    secret: str,
    admin_port: int,
    cpus: str | None,
) -> subprocess.Popen[bytes]:
    """`python -m proxy run` with `config` (its upstreams' `client_secret` expanded from
    `secret` in the environment), once `/readyz` on `admin_port` answers 200."""
    config_file = workdir / "token-proxy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    proxy = group.start(
        "token-proxy",
        [sys.executable, "-m", "proxy", "run", "--config", str(config_file)],
        cpus=cpus,
        env={"BENCH_CLIENT_SECRET": secret, "PYTHONUNBUFFERED": "1"},
        cwd=REPO_ROOT,
    )
    group.wait_for_ok("token-proxy", proxy, f"http://127.0.0.1:{admin_port}/readyz")
    return proxy


def start_grpc_upstream(
    group: ProcessGroup, module: str, port: int, cpus: str | None
) -> subprocess.Popen[bytes]:
    """`python -m <module> --serve <port>` (a benchmark's grpcio upstream), once it
    listens."""
    upstream = group.start(
        "grpc-upstream",
        [sys.executable, "-m", module, "--serve", str(port)],
        cpus=cpus,
        cwd=REPO_ROOT,
    )
    group.wait_for_port("grpc-upstream", upstream, port)
    return upstream


def token_proxy_config(
    proxy_port: int, admin_port: int, upstreams: dict[str, dict[str, object]]
) -> dict[str, object]:
    """A benchmark's token-proxy config: the forward port, the admin port, warnings only
    (a log line per request would be measured too), and `upstreams` (`bench_upstream`)."""
    return {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "log_level": "warning",
        "upstreams": upstreams,
    }


def bench_upstream(
    name: str, host: str, url: str, token_port: int, listen: int | None = None, **token: object
) -> dict[str, object]:
    """One upstream of a benchmark's token-proxy: `host` sent to `url`, its own client
    id, the secret from the environment (`start_token_proxy`), and `token`'s keys."""
    config: dict[str, object] = {
        "match": {"hosts": [host]},
        "url": url,
        "token": {
            "token_url": f"http://127.0.0.1:{token_port}/oauth/token",
            "client_id": name,
            # Expanded by token-proxy from its environment: not written to disk.
            "client_secret": "${BENCH_CLIENT_SECRET}",
            **token,
        },
    }
    if listen is not None:
        config["listen"] = f"127.0.0.1:{listen}"
    return config
