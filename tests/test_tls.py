"""HTTPS on the client listener: real TLS clients, certificates made by the openssl command,
a replaced certificate served without a restart, bad PEM refused with one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.serve import bound_port, start_site
from proxy.tenants import Registry
from proxy.tls import CertificatePair, CertificateWatcher, server_context
from tests.conftest import CREDS_A, KEY_A, Upstream, make_settings, make_tenant
from tests.processes import eventually, gateway_process, process_env, tenant_entry
from tests.test_container import process_env as image_process_env
from tests.test_container import run_healthcheck

REFUSED = "TLS certificate reload refused; keeping the running one"
RELOADED = "TLS certificate reloaded"


@dataclass(frozen=True, slots=True)
class Authority:
    """A test certificate authority: the client trusts it, the leaves are signed by it."""

    root: Path
    cert: Path
    key: Path

    def issue(self, name: str) -> CertificatePair:
        """A leaf for 127.0.0.1 with common name ``name``."""
        key, request, cert = (self.root / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.root / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\n", encoding="ascii")
        openssl("req", "-new", *EC_KEY, "-nodes", "-keyout", key, "-out", request,
                "-subj", f"/CN={name}")  # fmt: skip
        openssl(
            "x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", cert,
        )  # fmt: skip
        return CertificatePair(cert, key)

    def client(self) -> ssl.SSLContext:
        """A client context trusting only this authority (hostname checked)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.cert)
        return context


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")


def openssl(*args: str | Path) -> None:
    """Run the openssl command line (``make test`` installs it when missing)."""
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    root = tmp_path / "pki"
    root.mkdir()
    cert, key = root / "ca.pem", root / "ca.key"
    openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", key, "-out", cert,
            "-days", "2", "-subj", "/CN=test-ca")  # fmt: skip
    return Authority(root, cert, key)


def install(pair: CertificatePair, target: CertificatePair) -> None:
    """Put ``pair`` where the gateway reads ``target`` (each file replaced, as a deploy does)."""
    replace_file(pair.key, target.key)
    replace_file(pair.cert, target.cert)


def replace_file(source: Path, dest: Path) -> None:
    scratch = dest.with_suffix(".new")
    shutil.copyfile(source, scratch)
    os.replace(scratch, dest)


def served_files(tmp_path: Path, pair: CertificatePair) -> CertificatePair:
    """Copies of ``pair`` at the fixed paths the gateway is configured with."""
    target = CertificatePair(tmp_path / "tls.crt", tmp_path / "tls.key")
    install(pair, target)
    return target


async def served_name(port: int, client: ssl.SSLContext) -> str:
    """The common name of the certificate a NEW connection to ``port`` is shown."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    try:
        peer = writer.get_extra_info("peercert")
    finally:
        writer.close()
        await writer.wait_closed()
    return str(dict(part[0] for part in peer["subject"])["commonName"])


async def shows(port: int, client: ssl.SSLContext, name: str) -> None:
    async def check() -> bool:
        return await served_name(port, client) == name

    await eventually(check, what=f"new connections to show the certificate {name!r}", timeout=10)


@pytest.fixture
async def https_port(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> AsyncIterator[tuple[int, CertificateWatcher]]:
    """The gateway listening in-process with HTTPS on ``first``; its watcher (not polling)."""
    pair = served_files(tmp_path, authority.issue("first"))
    context = server_context(pair)
    app = create_app(
        make_settings(), Registry([make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)])
    )
    runner = await start_site(app, "127.0.0.1", 0, ssl_context=context)
    try:
        yield bound_port(runner), CertificateWatcher(context, pair)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------


async def test_https_answers_a_client_that_trusts_the_ca(
    https_port: tuple[int, CertificateWatcher], authority: Authority
) -> None:
    port, _ = https_port
    async with aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{port}/api/openapi/status"
        async with session.get(url, headers={"x-api-key": KEY_A}, ssl=authority.client()) as r:
            assert r.status == 200
            assert (await r.json())["data"]["apiKeyAlias"] == "tenant-a"
    assert await served_name(port, authority.client()) == "first"


async def test_server_context_refuses_tls_below_1_2(tmp_path: Path, authority: Authority) -> None:
    context = server_context(authority.issue("first"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_reload_serves_new_handshakes_and_keeps_open_connections(
    https_port: tuple[int, CertificateWatcher], authority: Authority
) -> None:
    port, watcher = https_port
    client = authority.client()
    _reader, open_writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    install(authority.issue("second"), watcher.pair)
    assert watcher.reload()
    assert await served_name(port, client) == "second"
    # The connection made before the reload still has its session and still works.
    open_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await _reader.read()).startswith(b"HTTP/1.1 200")
    open_writer.close()


async def test_a_pair_replaced_file_by_file_is_loaded_once_whole_never_refused_half_way(
    https_port: tuple[int, CertificateWatcher],
    authority: Authority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.tls")
    port, served = https_port
    watcher = CertificateWatcher(served.context, served.pair, interval=0.01)
    task = asyncio.create_task(watcher.watch())
    try:
        second = authority.issue("second")
        caplog.clear()
        replace_file(second.key, served.pair.key)  # the key first, as a deploy copying files
        await asyncio.sleep(0.05)  # several polls see the new key with the old certificate
        replace_file(second.cert, served.pair.cert)  # then the certificate
        await shows(port, authority.client(), "second")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    logged = [r.message for r in caplog.records if r.name == "proxy.tls"]
    assert logged == [RELOADED]


@pytest.mark.parametrize("bad", ["junk", "mismatched key", "missing key"])
async def test_a_bad_new_pair_is_refused_logged_and_the_old_one_stays(
    bad: str,
    https_port: tuple[int, CertificateWatcher],
    authority: Authority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, watcher = https_port
    other = authority.issue("second")
    if bad == "junk":
        watcher.pair.cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n", "ascii")
    elif bad == "mismatched key":
        install(CertificatePair(watcher.pair.cert, other.key), watcher.pair)
    else:
        watcher.pair.key.unlink()
    assert not watcher.reload()
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [REFUSED]
    assert await served_name(port, authority.client()) == "first"


async def test_a_replaced_certificate_is_served_within_10_s_without_a_restart(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    pair = served_files(tmp_path, authority.issue("first"))
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    settings = {"TLS_CERT_FILE": str(pair.cert), "TLS_KEY_FILE": str(pair.key)}
    async with gateway_process(tmp_path, tenants, **settings) as gateway:
        assert gateway.url.startswith("https://")
        client = authority.client()
        assert await served_name(gateway.port, client) == "first"
        pair.cert.write_text("not a certificate\n", encoding="ascii")
        await gateway.wait_logged(REFUSED)
        assert await served_name(gateway.port, client) == "first"
        install(authority.issue("second"), pair)
        await shows(gateway.port, client, "second")
        await gateway.wait_logged(RELOADED)


@pytest.mark.slow
async def test_every_worker_loads_and_reloads_its_own_context(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    pair = served_files(tmp_path, authority.issue("first"))
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    settings = {"TLS_CERT_FILE": str(pair.cert), "TLS_KEY_FILE": str(pair.key), "WORKERS": "2"}
    async with gateway_process(tmp_path, tenants, **settings) as gateway:
        await gateway.wait_logged("gateway listening", count=2)
        install(authority.issue("second"), pair)
        await gateway.wait_logged(RELOADED, count=2)
        client = authority.client()
        names = {await served_name(gateway.port, client) for _ in range(12)}
        assert names == {"second"}


def start_with(tmp_path: Path, cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """``python -m proxy serve`` with one tenant and this pair; it must exit on its own."""
    env = process_env(
        EXTERNAL_API_KEY_1=KEY_A,
        OPENAPI_ACCESS_KEY="ak-test",
        OPENAPI_ACCESS_SECRET="sk-test",
        TLS_CERT_FILE=str(cert),
        TLS_KEY_FILE=str(key),
        PORT="0",
    )
    argv = [sys.executable, "-m", "proxy", "serve"]
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("case", "named", "why"),
    [
        ("junk certificate", "TLS_CERT_FILE", "no PEM certificate in it"),
        ("key as certificate", "TLS_CERT_FILE", "no PEM certificate in it"),
        ("key of another certificate", "TLS_KEY_FILE", "does not belong to the certificate"),
        ("certificate as key", "TLS_KEY_FILE", "no unencrypted PEM private key"),
        ("encrypted key", "TLS_KEY_FILE", "no unencrypted PEM private key"),
    ],
)
def test_bad_pem_at_start_up_is_one_clear_line_and_exit_1(
    case: str, named: str, why: str, tmp_path: Path, authority: Authority
) -> None:
    pair, other = authority.issue("first"), authority.issue("second")
    cert, key = pair.cert, pair.key
    if case == "junk certificate":
        cert = tmp_path / "junk.pem"
        cert.write_text("hello\n", encoding="ascii")
    elif case == "key as certificate":
        cert = pair.key
    elif case == "key of another certificate":
        key = other.key
    elif case == "certificate as key":
        key = pair.cert
    else:
        key = tmp_path / "encrypted.key"
        openssl("pkey", "-in", pair.key, "-aes128", "-passout", "pass:x", "-out", key)
    done = start_with(tmp_path, cert, key)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    problems = [line.strip() for line in done.stderr.splitlines()[1:]]
    assert done.stderr.splitlines()[0] == "configuration error:"
    assert len(problems) == 1
    assert problems[0].startswith(f"{named}={cert if named == 'TLS_CERT_FILE' else key}: ")
    assert why in problems[0]


async def test_the_image_healthcheck_speaks_https_when_tls_is_on(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    pair = served_files(tmp_path, authority.issue("first"))
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    settings = {"TLS_CERT_FILE": str(pair.cert), "TLS_KEY_FILE": str(pair.key)}
    async with gateway_process(tmp_path, tenants, **settings) as gateway:
        env = image_process_env(settings | {"PORT": str(gateway.port)})
        done = await asyncio.to_thread(run_healthcheck, env, tmp_path)
        assert done.returncode == 0, done.stderr
