"""hubd.catalog: who asked for a model, kept right when two processes (a daemon and an in-process `hubd pull`)
attribute the same model."""

from __future__ import annotations

from pathlib import Path

from hubd.catalog import Catalog
from hubd.layout import open_cache
from hubd.store import Store

DIGEST = "ab" * 32


def _catalog(cache: Path) -> Catalog:
    catalog = Catalog(cache, fsync=False)
    catalog.load()
    return catalog


def test_a_uid_another_process_recorded_is_kept_when_this_one_records_its_own(tmp_path: Path) -> None:
    open_cache(Store(tmp_path, fsync=False))
    daemon, cli = _catalog(tmp_path), _catalog(tmp_path)
    assert daemon.users(DIGEST) == []  # the daemon has read (and remembers) the record: nobody yet
    cli.attribute(DIGEST, 1001)  # meanwhile an in-process pull by uid 1001
    daemon.attribute(DIGEST, 1002)  # then uid 1002 asks the daemon
    assert _catalog(tmp_path).users(DIGEST) == [1001, 1002]  # on disk: both (1001 was lost before)
    assert daemon.users(DIGEST) == [1001, 1002]


def test_a_uid_already_recorded_costs_no_write(tmp_path: Path) -> None:
    open_cache(Store(tmp_path, fsync=False))
    catalog = _catalog(tmp_path)
    catalog.attribute(DIGEST, 1001)
    record = catalog.layout.user_record(DIGEST)
    before = record.stat().st_mtime_ns, record.stat().st_ino
    catalog.attribute(DIGEST, 1001)
    assert (record.stat().st_mtime_ns, record.stat().st_ino) == before
