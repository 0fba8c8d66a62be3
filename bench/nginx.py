"""nginx configs for the benchmark: the fast upstream and the reference proxy.

Each nginx instance gets its own prefix directory (pid file, error log, temp
paths), one worker process unless told otherwise, `daemon off` (so the
harness owns the master's PID) and `access_log off`. The proxy config is the
closest nginx equivalent of what Turnout does per request: hash the user id
into a version (`split_clients`), forward over pooled keep-alive upstream
connections, set X-Forwarded-*, keep the client's Host and add X-Turnout-Version.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# a token in an nginx config is limited to 4 KiB; larger bodies are served as files
MAX_INLINE_BODY = 3000

_COMMON = """\
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    server_tokens off;
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{body}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def prepare_prefix(prefix: Path) -> None:
    # when the harness runs as root, nginx workers run as "nobody": let them in
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    for path in (prefix, prefix / "tmp"):
        path.chmod(0o755)


def upstream_conf(prefix: Path, ports: dict[str, int], bodies: dict[str, bytes]) -> str:
    """One server per version name; each answers every request with its body."""
    servers = []
    for name, port in ports.items():
        body = bodies[name]
        if len(body) <= MAX_INLINE_BODY:
            location = f'return 200 "{body.decode()}";'
        else:
            www = prefix / "www"
            www.mkdir(exist_ok=True)
            www.chmod(0o755)
            (www / f"{name}.txt").write_bytes(body)
            (www / f"{name}.txt").chmod(0o644)
            location = (
                f"root {www}; rewrite ^ /{name}.txt break; etag off; "
                "open_file_cache max=16 inactive=60s;"
            )
        servers.append(
            f"    server {{\n"
            f"        listen 127.0.0.1:{port} backlog=4096;\n"
            f"        location / {{ {location} }}\n"
            f"    }}"
        )
    return _COMMON.format(prefix=prefix, body="\n".join(servers), workers=1)


def proxy_conf(
    prefix: Path,
    port: int,
    upstreams: dict[str, int],
    canary: str,
    weight: int,
    keepalive: bool = True,
    workers: int = 1,
    tls: tuple[Path, Path] | None = None,
    http2: bool = False,
) -> str:
    """The reference proxy: `split_clients` on X-User-Id, `weight`% to `canary`.

    `keepalive`: pooled HTTP/1.1 upstream connections (`keepalive 64`), as a tuned
    production config has; without it, NGINX's stock proxy behaviour: a new
    HTTP/1.0 upstream connection per request. `workers`: worker processes. `tls`:
    (certificate, key) to listen with TLS (1.2 and 1.3, a session cache, as a
    production edge would), the upstream side staying cleartext. `http2`: HTTP/2 to
    clients (ALPN h2 with `tls`, else h2c with prior knowledge).
    """
    stable = next(name for name in upstreams if name != canary)
    pool_lines = "        keepalive 64;\n        keepalive_requests 1000000;\n" if keepalive else ""
    pools = "\n".join(
        f"    upstream {name} {{\n        server 127.0.0.1:{up_port};\n{pool_lines}    }}"
        for name, up_port in upstreams.items()
    )
    http11 = (
        '            proxy_http_version 1.1;\n            proxy_set_header Connection "";\n'
        if keepalive
        else ""
    )
    if weight <= 0:
        split = f"* {stable};"
    elif weight >= 100:
        split = f"* {canary};"
    else:
        split = f"{weight}% {canary}; * {stable};"
    ssl, ssl_lines = "", ""
    if tls is not None:
        ssl = " ssl"
        ssl_lines = (
            f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_session_cache shared:SSL:10m;\n"
        )
    body = f"""\
    split_clients "${{http_x_user_id}}" $backend {{ {split} }}

{pools}

    server {{
        listen 127.0.0.1:{port}{ssl}{" http2" if http2 else ""} backlog=4096;
{ssl_lines}        location / {{
            proxy_pass http://$backend;
{http11}            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_max_temp_file_size 0;
            add_header X-Turnout-Version $backend always;
        }}
    }}"""
    return _COMMON.format(prefix=prefix, body=body, workers=workers)


def grpc_conf(prefix: Path, port: int, upstreams: dict[str, int], canary: str, weight: int) -> str:
    """gRPC the NGINX way: h2c to clients, `grpc_pass` over pooled HTTP/2 connections to
    the version `split_clients` picks on x-user-id."""
    stable = next(name for name in upstreams if name != canary)
    split = f"{weight}% {canary}; * {stable};" if 0 < weight < 100 else f"* {stable};"
    pool = "    upstream {} {{\n        server 127.0.0.1:{};\n        keepalive 64;\n    }}"
    pools = "\n".join(pool.format(name, up_port) for name, up_port in upstreams.items())
    body = f"""\
    split_clients "${{http_x_user_id}}" $backend {{ {split} }}

{pools}

    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://$backend;
            add_header X-Turnout-Version $backend always;
        }}
    }}"""
    return _COMMON.format(prefix=prefix, body=body, workers=1)


def command(nginx: str, prefix: Path) -> list[str]:
    return [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]


def write_conf(prefix: Path, text: str) -> None:
    prepare_prefix(prefix)
    (prefix / "nginx.conf").write_text(text)
