"""Processes the benchmark starts (gateway, upstreams, nginx) and how it watches them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

BENCH_KEY: Final = "bench-tenant-key-0123456789abcdef"
LOOPBACK: Final = "127.0.0.1"
GiB: Final = 1024**3


# A rate limit so high that it never refuses: every request still takes a token from a bucket.
RATE_LIMITED: Final = {"RATE_LIMIT_RPS": "1000000", "RATE_LIMIT_BURST": "1000000"}


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0) -> float:
    """Poll ``url`` until it answers 200; return the seconds it took."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@contextmanager
def process(
    argv: list[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the block's duration; SIGTERM (then SIGKILL) by its PID afterwards."""
    proc = subprocess.Popen(
        argv,
        env=dict(env) if env is not None else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tempfile.gettempdir(),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def gateway_env(upstream_port: int, **extra: str) -> dict[str, str]:
    """Environment for a gateway with one bench tenant pointed at the upstream."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTERNAL_API_KEY", "OPENAPI_"))
    }
    env.update(
        {
            "EXTERNAL_API_KEY_1": BENCH_KEY,
            "EXTERNAL_API_KEY_1_ALIAS": "bench",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "bench-ak",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "bench-secret",
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": f"http://{LOOPBACK}:{upstream_port}",
            "MAX_UPLOAD_BYTES": str(2 * GiB),
            "TENANTS_FILE": "",
            "ENV_FILE": os.devnull,  # no stray .env in the working directory
        }
    )
    env.update(extra)
    return env


@contextmanager
def gateway(
    upstream_port: int, *extra_args: str, **extra_env: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, float]]:
    """A gateway process; yields (process, port, seconds from spawn to /readyz 200)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *extra_args,
    ]
    started = time.perf_counter()
    with process(argv, gateway_env(upstream_port, **extra_env)) as proc:
        wait_http(f"http://{LOOPBACK}:{port}/readyz")
        yield proc, port, time.perf_counter() - started


@contextmanager
def python_upstream(latency: float = 0.0) -> Iterator[int]:
    """The aiohttp benchmark upstream in its own process; yields its port."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--latency", str(latency)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with process(argv, env):
        wait_http(f"http://{LOOPBACK}:{port}/openapi/ping")
        yield port


@contextmanager
def bare_proxy(origin_port: int, client: str) -> Iterator[int]:
    """A minimal forwarder (bench/bare_proxy.py) with ``client`` ("session" or "http1") in
    front of the origin; yields its port."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.bare_proxy",
        "--port",
        str(port),
        "--origin",
        f"http://{LOOPBACK}:{origin_port}",
        "--client",
        client,
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with process(argv, env):
        wait_http(f"http://{LOOPBACK}:{port}/openapi/ping")
        yield port


NGINX_CONF: Final = """
worker_processes 1;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{origin_port};
        location / {{
            default_type application/json;
            return 200 '{{"code":0,"message":"success","data":{{"list":[],"total":0}}}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header accessKey bench-ak;
        }}
    }}
}}
"""


@contextmanager
def nginx(upstream_port: int | None = None) -> Iterator[tuple[int, int] | None]:
    """nginx as a static origin and as a plain reverse proxy to ``upstream_port``
    (its own origin when None); yields (origin port, proxy port), or None without nginx."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as root:
        origin_port, proxy_port = free_port(), free_port()
        conf = Path(root, "nginx.conf")
        conf.write_text(
            NGINX_CONF.format(
                root=root,
                origin_port=origin_port,
                proxy_port=proxy_port,
                upstream_port=upstream_port or origin_port,
            )
        )
        argv = [binary, "-p", root, "-c", str(conf), "-g", "daemon off;"]
        with process(argv):
            wait_http(f"http://{LOOPBACK}:{origin_port}/openapi/ping")
            yield origin_port, proxy_port
