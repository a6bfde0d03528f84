"""The daemon's log (#13 item 9): one line per fetch, a settable level, no second timestamp under journald, and
an access log at debug."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import start_daemon

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def fetch_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " fetch handle=" in line]


def test_one_line_per_fetch_says_bytes_seconds_source_and_hit_or_miss(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    d = start_daemon(settings, tmp_path)
    try:
        assert d.request("POST", "/v1/resolve", {"handle": tfhub(path)}).status == 200
        assert d.request("POST", "/v1/resolve", {"handle": tfhub(path)}).status == 200
        missing = d.request("POST", "/v1/resolve", {"handle": tfhub("nobody/nothing/1")})
        assert missing.status == 404
    finally:
        d.stop()
    miss, hit, failed = fetch_lines(d.log())
    size = len(upstream.models["reusable"])
    assert re.search(rf"handle={re.escape(tfhub(path))} cache=miss bytes={size} seconds=[\d.]+ from=mirror$", miss)
    assert re.search(rf"handle={re.escape(tfhub(path))} cache=hit bytes=0 seconds=[\d.]+$", hit)
    assert "cache=miss failed after" in failed and "not_found" in failed


def test_log_level_warning_drops_the_fetch_lines(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    d = start_daemon(settings, tmp_path, "--log-level", "warning")
    try:
        assert d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))}).status == 200
    finally:
        d.stop()
    assert fetch_lines(d.log()) == [] and " INFO " not in d.log()


def test_debug_adds_an_access_log(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    d = start_daemon(settings, tmp_path, env_extra={"HUBD_LOG_LEVEL": "debug"})
    try:
        assert d.request("GET", "/v1/health").status == 200
    finally:
        d.stop()
    access = [line for line in d.log().splitlines() if "hubd.access" in line]
    assert any('"GET /v1/health HTTP/1.1" 200' in line for line in access), d.log()


def test_no_access_log_at_info(settings: Settings, tmp_path: Path) -> None:
    d = start_daemon(settings, tmp_path)
    try:
        assert d.request("GET", "/v1/health").status == 200
    finally:
        d.stop()
    assert "hubd.access" not in d.log()


@pytest.mark.slow
def test_under_journald_lines_carry_no_timestamp(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    d = start_daemon(settings, tmp_path, env_extra={"JOURNAL_STREAM": "8:12345"})
    try:
        assert d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))}).status == 200
    finally:
        d.stop()
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert lines and not any(STAMP.match(line) for line in lines), lines
    assert lines[0].startswith("INFO hubd: hubd ready")
    plain = start_daemon(settings, tmp_path)
    plain.stop()
    assert STAMP.match(plain.log().splitlines()[0])


def test_an_unknown_level_is_one_error_line(settings: Settings, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import cli_env

    env = {**cli_env(settings), "HUBD_LOG_LEVEL": "loud", "HUBD_SOCKET": str(tmp_path / "s.sock")}
    result = subprocess.run([sys.executable, "-m", "hubd", "serve"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("hubd: error: unknown log level 'loud'") and "Traceback" not in result.stderr
