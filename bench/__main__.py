"""``make bench``: the gateway measured side by side with its upstream and nginx, in one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import instructions, streaming
from bench.instructions import have_callgrind
from bench.load import LoadResult, have_wrk, wrk, wrk_count
from bench.procs import (
    LOOPBACK,
    RATE_LIMITED,
    GiB,
    bare_proxy,
    gateway,
    nginx,
    python_upstream,
    rss_kib,
)
from tests.redis_server import RedisServer

REFERENCE_RPS: Final = 760.0
RESULTS: Final = Path(__file__).resolve().parent / "results"
PATH: Final = "/openapi/aiagent/task/list"


def url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}{PATH}"


def throughput(args: argparse.Namespace, origin: int, proxy: int | None) -> dict[str, Any]:
    """Req/s and latency of every target, in interleaved rounds; the median round of each."""
    workers = len(os.sched_getaffinity(0))
    with (
        redis_server() as redis_url,
        gateway(origin) as (_gw, gateway_port, _ready),
        gateway(origin, STATE_URL=redis_url, **RATE_LIMITED) as (_gr, redis_port, _ready_r),
        bare_proxy(origin, "session") as session_port,
        bare_proxy(origin, "http1") as http1_port,
        gateway(origin, "--workers", str(workers)) as (_gws, workers_port, _ready_n),
    ):
        targets = {
            "direct": origin,
            "gateway": gateway_port,
            "gateway_redis_limited": redis_port,
            "nginx_proxy": proxy,
            "bare_aiohttp_proxy": session_port,
            "bare_http1_proxy": http1_port,
            f"gateway_{workers}_workers": workers_port,
        }
        ports = {name: port for name, port in targets.items() if port is not None}
        for port in ports.values():
            wrk(url(port), seconds=1)  # warm-up: pooled connections, caches
        runs: dict[str, list[LoadResult]] = {}
        for _ in range(args.rounds):
            for name, port in ports.items():
                runs.setdefault(name, []).append(wrk(url(port), seconds=args.seconds))
            # One connection: no queueing, so the added latency shows.
            for name in ("direct", "gateway", "gateway_redis_limited"):
                one = wrk(url(ports[name]), connections=1, seconds=args.seconds)
                runs.setdefault(f"{name}_1conn", []).append(one)
    return {name: asdict(median(results)) for name, results in runs.items()}


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 for the rate-limited gateway; its URL."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def median(results: list[LoadResult]) -> LoadResult:
    """The run with the median throughput (the machines are shared and noisy)."""
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def memory(origin: int, total: int) -> dict[str, float]:
    """Gateway RSS after at least 10% of ``total`` requests and after at least all of them."""
    with gateway(origin) as (proc, port, ready):
        idle = rss_kib(proc.pid)[0] / 1024
        first = wrk_count(url(port), total // 10)
        after_first = rss_kib(proc.pid)[0] / 1024
        served = first + wrk_count(url(port), total - first)
        after_all = rss_kib(proc.pid)[0] / 1024
    return {
        "startup_to_ready_s": ready,
        "idle_rss_mib": idle,
        "first_requests": first,
        "rss_after_first_mib": after_first,
        "all_requests": served,
        "rss_after_all_mib": after_all,
        "growth_mib": after_all - after_first,
    }


def stream(size: int) -> dict[str, float]:
    """Peak RSS added while ``size`` bytes stream each way through a fresh gateway."""
    with python_upstream() as origin, gateway(origin) as (proc, port, _ready):
        return {"bytes": size, **streaming.measure(proc.pid, port, size)}


def append(numbers: int) -> dict[str, Any]:
    """append-numbers against a 20 ms upstream, if that benchmark is present."""
    try:
        from bench import append_bench
    except ImportError:
        return {"skipped": "bench/append_bench.py not present"}
    result: dict[str, Any] = append_bench.run(numbers)
    return result


def machine() -> dict[str, Any]:
    """Facts that make figures comparable."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(res: dict[str, Any]) -> list[str]:
    """The human table: figures, ratios and targets."""
    rows = ["| measure | value | target | ok |", "|---|---|---|---|"]

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        mark = "" if ok is None else ("yes" if ok else "NO")
        rows.append(f"| {name} | {value} | {target} | {mark} |")

    t = res.get("throughput", {})
    for name, run in t.items():
        r = LoadResult(**run)
        row(
            f"{name}: req/s, p50, p99",
            f"{r.rps:,.0f} req/s, {r.p50_ms:.2f} ms, {r.p99_ms:.2f} ms ({r.errors} errors)",
        )
    if "gateway" in t:
        gw = LoadResult(**t["gateway"])
        if "nginx_proxy" in t:
            share = ratio(gw.rps, LoadResult(**t["nginx_proxy"]).rps)
            row("gateway / nginx proxy throughput", f"{share:.1%}", ">= 20%", share >= 0.2)
        for bare in ("bare_aiohttp_proxy", "bare_http1_proxy"):
            if bare in t:
                floor = ratio(gw.rps, LoadResult(**t[bare]).rps)
                row(f"gateway / {bare.replace('_', ' ')} throughput", f"{floor:.0%}")
        if "bare_http1_proxy" in t and "nginx_proxy" in t:
            floor = ratio(
                LoadResult(**t["bare_http1_proxy"]).rps, LoadResult(**t["nginx_proxy"]).rps
            )
            row("bare http1 proxy / nginx proxy throughput", f"{floor:.1%}")
        ref = ratio(gw.rps, REFERENCE_RPS)
        row(
            "gateway / reference's 760 req/s (its figure, from its own machine)",
            f"{ref:.1f}x",
            ">= 10x",
            ref >= 10,
        )
        workers = [k for k in t if k.endswith("_workers")]
        for k in workers:
            row(f"{k} / 1 worker", f"{ratio(LoadResult(**t[k]).rps, gw.rps):.2f}x")
    if "gateway_redis_limited" in t and "gateway" in t:
        limited, plain = LoadResult(**t["gateway_redis_limited"]), LoadResult(**t["gateway"])
        kept = ratio(limited.rps, plain.rps)
        row(
            "rate-limited through Redis / no limit, throughput",
            f"{kept:.0%}",
            ">= 80%",
            kept >= 0.8,
        )
    if "gateway_redis_limited_1conn" in t:
        limited = LoadResult(**t["gateway_redis_limited_1conn"])
        plain = LoadResult(**t["gateway_1conn"])
        more = limited.p50_ms - plain.p50_ms
        row(
            "rate limit through Redis: p50 added (1 connection)",
            f"{more:.3f} ms",
            "<= 0.3 ms",
            more <= 0.3,
        )
    if "gateway_1conn" in t:
        g, d = LoadResult(**t["gateway_1conn"]), LoadResult(**t["direct_1conn"])
        row(
            "added latency p50 (1 connection)",
            f"{g.p50_ms - d.p50_ms:.3f} ms",
            "<= 0.5 ms",
            g.p50_ms - d.p50_ms <= 0.5,
        )
        row(
            "added latency p99 (1 connection)",
            f"{g.p99_ms - d.p99_ms:.3f} ms",
            "<= 2 ms",
            g.p99_ms - d.p99_ms <= 2,
        )
    c = res.get("instructions", {})
    if c:
        row(
            f"instructions per forward, callgrind, {c['requests']} requests on 1 connection",
            f"gateway {c['gateway'] / 1000:,.0f}k, bare http1 proxy "
            f"{c['bare_http1_proxy'] / 1000:,.0f}k: {c['ratio']:.2f}x",
        )
        row(
            "instructions per forward, callgrind: a rate-limited tenant (buckets in memory)",
            f"{c['gateway_rate_limited'] / 1000:,.0f}k: "
            f"{c['gateway_rate_limited'] / c['gateway']:.2f}x the gateway with no limit",
        )
    m = res.get("memory", {})
    if m:
        row(
            "start-up to /readyz 200",
            f"{m['startup_to_ready_s']:.2f} s",
            "< 1 s",
            m["startup_to_ready_s"] < 1,
        )
        row("idle RSS", f"{m['idle_rss_mib']:.1f} MiB", "< 60 MiB", m["idle_rss_mib"] < 60)
        row(
            f"RSS after {m['first_requests']:,} / {m['all_requests']:,} requests",
            f"{m['rss_after_first_mib']:.1f} / {m['rss_after_all_mib']:.1f} MiB",
        )
        row(
            "RSS growth between the two",
            f"{m['growth_mib']:+.1f} MiB",
            "within 5 MiB",
            abs(m["growth_mib"]) <= 5,
        )
    s = res.get("streaming", {})
    for way in ("download", "upload"):
        if f"{way}_added_mib" in s:
            added = s[f"{way}_added_mib"]
            row(
                f"{s['bytes'] / GiB:g} GiB {way}: peak RSS added, speed",
                f"{added:.1f} MiB, {s[f'{way}_mib_per_s']:.0f} MiB/s",
                "<= 50 MiB",
                added <= 50,
            )
    a = res.get("append", {})
    if "wall_s" in a:
        complete = a["succeeded"] == a["numbers"]
        row(
            f"append-numbers {a['numbers']} numbers, 20 ms upstream (all appended: {complete})",
            f"{a['wall_s']:.3f} s",
            "< 1 s",
            a["wall_s"] < 1 and complete,
        )
    for backend, wall in a.get("journaled_wall_s", {}).items():
        name = f"append-numbers {a['numbers']} numbers, Idempotency-Key journaled on {backend}"
        row(name, f"{wall:.3f} s", "< 1 s", wall < 1)
    return rows


def main() -> int:
    """Run every phase, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target")
    parser.add_argument("--requests", type=int, default=200_000, help="memory phase total")
    parser.add_argument("--stream-bytes", type=int, default=GiB, help="streaming phase size")
    parser.add_argument("--append-numbers", type=int, default=10_000)
    parser.add_argument(
        "--counted", type=int, default=300, help="requests counted under callgrind (0: skip)"
    )
    args = parser.parse_args()
    if not have_wrk():
        print("wrk is not installed: `apt-get install wrk` (make bench does it)", file=sys.stderr)
        return 1
    res: dict[str, Any] = {
        "machine": machine(),
        "method": f"wrk -t1 -c64, 200-byte POST; "
        f"median of {args.rounds} interleaved {args.seconds:g}s rounds",
    }
    with nginx() as ports:
        with python_upstream() as py_origin:
            origin = ports[0] if ports else py_origin
            res["upstream"] = "nginx static origin" if ports else "aiohttp upstream"
            res["throughput"] = throughput(args, origin, ports[1] if ports else None)
            res["memory"] = memory(origin, args.requests)
            if have_callgrind() and args.counted:
                try:
                    res["instructions"] = instructions.measure(origin, args.counted)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    # One phase failing must not lose the others' figures.
                    res["instructions_error"] = f"{exc.__class__.__name__}: {exc}"
    res["streaming"] = stream(args.stream_bytes)
    res["append"] = append(args.append_numbers)
    lines = [f"{res['method']}; {res['upstream']}", "", *table(res)]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
