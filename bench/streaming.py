"""Peak gateway memory while 1 GiB goes through it, each way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Final

import aiohttp

from bench.procs import BENCH_KEY, LOOPBACK, rss_kib

CHUNK: Final = 1024 * 1024


@contextmanager
def peak_rss(pid: int) -> Iterator[Callable[[], int]]:
    """Sample the process RSS every 20 ms; the yielded function gives the peak in KiB."""
    peak = [rss_kib(pid)[0]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_kib(pid)[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        thread.join()


async def download(port: int, size: int) -> tuple[int, float]:
    """GET ``size`` bytes through the gateway; return (bytes received, seconds)."""
    url = f"http://{LOOPBACK}:{port}/openapi/bench/download?size={size}"
    headers = {"x-api-key": BENCH_KEY, "action": "benchDownload"}
    started = time.perf_counter()
    received = 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.get(url, headers=headers) as resp:
            resp.raise_for_status()
            async for chunk in resp.content.iter_chunked(CHUNK):
                received += len(chunk)
    return received, time.perf_counter() - started


async def upload(port: int, size: int) -> tuple[int, float]:
    """POST ``size`` bytes as one multipart file part through the gateway."""
    url = f"http://{LOOPBACK}:{port}/openapi/bench/upload"
    headers = {"x-api-key": BENCH_KEY, "action": "benchUpload"}

    async def body() -> AsyncIterator[bytes]:
        block, left = b"\0" * CHUNK, size
        while left > 0:
            yield block[: min(CHUNK, left)]
            left -= CHUNK

    started = time.perf_counter()
    with aiohttp.MultipartWriter("form-data") as form:
        part = form.append(body())
        part.set_content_disposition("form-data", name="file", filename="numbers.csv")
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, data=form, headers=headers) as resp:
            answer = await resp.json()
    return int(answer["data"]["bytes"]), time.perf_counter() - started


def measure(pid: int, port: int, size: int) -> dict[str, float]:
    """Peak RSS added by a download and by an upload of ``size`` bytes, in MiB."""
    figures: dict[str, float] = {}
    for name, run in (("download", download), ("upload", upload)):
        base = rss_kib(pid)[0]
        with peak_rss(pid) as peak:
            moved, seconds = asyncio.run(run(port, size))
        if moved < size:
            raise RuntimeError(f"{name}: only {moved} of {size} bytes arrived")
        figures[f"{name}_added_mib"] = (peak() - base) / 1024
        figures[f"{name}_mib_per_s"] = size / (1024 * 1024) / seconds
    return figures
