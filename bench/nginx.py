"""nginx configurations for the benchmark: the origin and the baseline proxies.

Both run as their own nginx instance with one worker, so each can be pinned to its
own core and its CPU time read alone:

* the origin answers `/` with a fixed 1 KiB body and serves `/big` (the 1 GiB file)
  with sendfile; it answers 401 to a request without `Authorization: Bearer ...`,
  so a proxy that forgot the token shows up as errors, not as fast numbers;
* the baseline is what token-proxy is measured against: `proxy_pass` to the origin
  with upstream keep-alive, adding a static Authorization header; `/big` with larger
  proxy buffers and `/upload` streamed unbuffered to the upload sink.

`bench.grpc_unary` has a gRPC baseline of its own (`grpc_baseline_config`).

All lift nginx's default of 1,000 requests per keep-alive connection, which would
otherwise make every proxy reconnect to the origin mid-run.
"""

from __future__ import annotations

from pathlib import Path

BODY_SIZE = 1024
STATIC_TOKEN = "static-bench-token"
KEEPALIVE_REQUESTS = 10_000_000


def _main_block(name: str, directory: Path) -> str:
    return f"""
worker_processes 1;
worker_rlimit_nofile 16384;
pid {directory}/{name}.pid;
events {{ worker_connections 8192; }}
"""


def _http_common(name: str, directory: Path) -> str:
    return f"""
    access_log off;
    error_log {directory}/{name}-error.log warn;
    client_body_temp_path {directory}/{name}-body;
    proxy_temp_path {directory}/{name}-proxy;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 120s;
    default_type application/octet-stream;
"""


def origin_config(directory: Path, port: int, big_file: Path) -> str:
    body = "x" * BODY_SIZE
    return (
        _main_block("origin", directory)
        + f"""
http {{
{_http_common("origin", directory)}
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        if ($http_authorization !~ "^Bearer .") {{ return 401; }}
        location = /big {{ alias {big_file}; }}
        location / {{ return 200 "{body}"; }}
    }}
}}
"""
    )


def baseline_config(directory: Path, port: int, origin_port: int, sink_port: int) -> str:
    proxy_common = f"""
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {STATIC_TOKEN}";"""
    return (
        _main_block("baseline", directory)
        + f"""
http {{
{_http_common("baseline", directory)}
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 256;
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    upstream sink {{
        server 127.0.0.1:{sink_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;{proxy_common}
        }}
        location = /big {{
            proxy_pass http://origin;{proxy_common}
            # Stream through memory, never temp files; 64 KiB buffers double nginx's
            # large-body rate over the default 4 KiB pages: the stronger baseline.
            proxy_max_temp_file_size 0;
            proxy_buffers 16 64k;
            proxy_buffer_size 64k;
        }}
        location = /upload {{
            proxy_pass http://sink;{proxy_common}
            client_max_body_size 0;
            client_body_buffer_size 64k;
            proxy_request_buffering off;
        }}
    }}
}}
"""
    )


def grpc_baseline_config(directory: Path, port: int, upstream_port: int) -> str:
    """gRPC's baseline (`bench.grpc_unary`): cleartext HTTP/2 with prior knowledge in,
    `grpc_pass` to the grpcio upstream over kept-alive connections, with a static
    `authorization` field added."""
    return (
        _main_block("grpc-baseline", directory)
        + f"""
http {{
{_http_common("grpc-baseline", directory)}
    http2_max_concurrent_streams 1024;
    upstream grpc_origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://grpc_origin;
            grpc_set_header Authorization "Bearer {STATIC_TOKEN}";
        }}
    }}
}}
"""
    )


def nginx_command(config_file: Path, directory: Path) -> list[str]:
    """Run nginx in the foreground with everything under `directory`."""
    return [
        "nginx",
        "-p",
        str(directory),
        "-e",
        str(directory / f"{config_file.stem}-startup.log"),
        "-c",
        str(config_file),
        "-g",
        "daemon off;",
    ]
