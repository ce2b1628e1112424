"""The tenants-file writer: concurrent writers in separate processes lose nothing, a reader never
sees a partial file, the file's mode is kept, and every write is checked like start-up."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from proxy.admin.edits import create_edit
from proxy.admin.store import TenantsFile
from proxy.config import parse_settings
from proxy.errors import GatewayError
from proxy.tenants import Registry, load_registry

WRITES_EACH = 15


def tenants_file(path: Path) -> TenantsFile:
    """The writer as the admin API builds it, validating with the start-up checks."""
    settings = parse_settings({"TENANTS_FILE": str(path)})

    def validate(document: Any) -> Registry:
        return load_registry({}, settings, document=document)

    return TenantsFile(path, validate)


def create_many(path: str, prefix: str, count: int) -> None:
    """Run in a child process: ``count`` creates, one write each."""
    store = tenants_file(Path(path))
    for n in range(count):
        store.change(create_edit({"alias": f"{prefix}-{n}", "openapi": {}}))


def rewrite_many(path: str, count: int) -> None:
    """Run in a child process: ``count`` writes that grow and shrink the file."""
    store = tenants_file(Path(path))
    for n in range(count):
        store.change(create_edit({"alias": f"grow-{n}", "description": "x" * (n * 500)}))


def seed(path: Path) -> Path:
    path.write_text(json.dumps([{"apiKey": "seed-key-0123456789", "alias": "seed"}]))
    return path


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = seed(tmp_path / "tenants.json")
    spawn = multiprocessing.get_context("spawn")
    writers = [
        spawn.Process(target=create_many, args=(str(path), name, WRITES_EACH))
        for name in ("left", "right")
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    aliases = [entry["alias"] for entry in json.loads(path.read_text())]
    expected = {f"{side}-{n}" for side in ("left", "right") for n in range(WRITES_EACH)}
    assert set(aliases) == expected | {"seed"} and len(aliases) == 2 * WRITES_EACH + 1
    assert len(load_registry({}, parse_settings({"TENANTS_FILE": str(path)}))) == len(aliases)


def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = seed(tmp_path / "tenants.json")
    writer = multiprocessing.get_context("spawn").Process(target=rewrite_many, args=(str(path), 40))
    writer.start()
    reads = 0
    try:
        while writer.is_alive() or reads == 0:
            document = json.loads(path.read_bytes())  # raises on a partial file
            assert isinstance(document, list) and document[0]["alias"] == "seed"
            reads += 1
    finally:
        writer.join(60)
    assert writer.exitcode == 0 and reads > 1
    assert len(json.loads(path.read_text())) == 41
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_write_keeps_the_files_mode(tmp_path: Path) -> None:
    path = seed(tmp_path / "tenants.json")
    os.chmod(path, 0o640)
    tenants_file(path).change(create_edit({"alias": "new"}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_write_the_checks_refuse_leaves_the_file_alone(tmp_path: Path) -> None:
    path = seed(tmp_path / "tenants.json")
    before = path.read_bytes()
    with pytest.raises(GatewayError) as refused:
        tenants_file(path).change(create_edit({"alias": "bad", "openapi": {"baseUrl": "x"}}))
    assert refused.value.code == "INVALID_TENANT"
    assert path.read_bytes() == before


def test_writes_are_refused_without_a_writable_file(tmp_path: Path) -> None:
    for store in (TenantsFile(None, None), tenants_file(tmp_path / "missing.json")):
        reason = store.read_only_reason()
        assert reason is not None and "TENANTS_FILE" in reason
        with pytest.raises(GatewayError) as refused:
            store.change(create_edit({"alias": "x"}))
        assert (refused.value.status, refused.value.code) == (409, "READ_ONLY_CONFIG")


def test_a_file_that_is_not_json_is_refused_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text("{broken")
    with pytest.raises(GatewayError) as refused:
        tenants_file(path).change(create_edit({"alias": "x"}))
    assert refused.value.code == "READ_ONLY_CONFIG"
    assert path.read_text() == "{broken"


def test_the_document_shape_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"keys": [{"apiKey": "seed-key-0123456789", "alias": "seed"}]}))
    tenants_file(path).change(create_edit({"alias": "new"}))
    assert [e["alias"] for e in json.loads(path.read_text())["keys"]] == ["seed", "new"]
