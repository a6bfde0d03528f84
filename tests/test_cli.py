"""The `hubd` command as a user runs it: real processes sharing one cache root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream, cli_env, run_on_terminal
from tests.hosting import Behaviour


def hubd(settings: Settings, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubd", *args],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def test_pull_prints_only_the_path_on_stdout(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    result = hubd(settings, "pull", f"https://tfhub.dev/{path}", check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert Path(lines[0], "saved_model.pb").is_file()
    assert "download" in result.stderr  # plain progress lines when not a terminal


def test_pull_with_wrong_sha256_fails_with_one_clear_line(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    result = hubd(settings, "pull", f"https://tfhub.dev/{path}", "--sha256", "ab" * 32)
    assert result.returncode == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("hubd:")]
    assert len(errors) == 1 and "sha256" in errors[0] and "hint:" in errors[0]


def test_bad_handle_fails_naming_the_accepted_forms(settings: Settings) -> None:
    result = hubd(settings, "pull", "not-a-handle")
    assert result.returncode == 1
    assert "hubd: error: not a model handle" in result.stderr
    assert "https://tfhub.dev/<publisher>/<model>/<version>" in result.stderr


@pytest.mark.slow
def test_ls_verify_and_rm(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("text_embedding")
    pulled = hubd(settings, "pull", f"https://tfhub.dev/{path}", check=True).stdout.strip()
    table = hubd(settings, "ls", check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "SIZE", "STATE"]
    assert f"tfhub.dev/{path}" in table
    listed = json.loads(hubd(settings, "ls", "--json", check=True).stdout)
    assert [e["path"] for e in listed] == [pulled]
    assert hubd(settings, "verify", check=True).stdout.startswith("ok")

    os.chmod(pulled, 0o755)
    os.chmod(Path(pulled, "saved_model.pb"), 0o644)
    Path(pulled, "saved_model.pb").write_bytes(b"tampered")
    broken = hubd(settings, "verify", "--no-heal")
    assert broken.returncode == 1 and "BROKEN" in broken.stdout and "saved_model.pb" in broken.stdout

    removed = hubd(settings, "rm", f"https://tfhub.dev/{path}", check=True)
    assert removed.stdout.startswith("removed")
    assert json.loads(hubd(settings, "ls", "--json", check=True).stdout) == []


@pytest.mark.slow
def test_eight_processes_pulling_one_cold_handle_download_it_once(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=128 * 1024, throttle_delay=0.01))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hubd", "pull", f"https://tfhub.dev/{path}"],
            env=cli_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    failed = [err[-2000:] for proc, (_, err) in zip(procs, outputs, strict=True) if proc.returncode]
    assert failed == [], failed  # each failing process's own error, whole: a summary cut them off
    assert len({out.strip() for out, _ in outputs}) == 1
    assert upstream.requests(path) == 1
    assert upstream.bytes_sent(path) == len(upstream.models["large_4mb"])


def test_killed_mid_extraction_leaves_nothing_visible(settings: Settings, upstream: Upstream) -> None:
    size = len(upstream.models["large_4mb"])
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=64 * 1024, throttle_delay=0.02))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubd", "pull", f"https://tfhub.dev/{path}"],
        env=cli_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert upstream.server.wait_sent(path, size // 2)
    staging = settings.cache_dir / "staging"
    assert any(staging.rglob("saved_model.pb")) or any(staging.rglob("variables*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for visible in ("objects", "refs", "meta"):
        assert list((settings.cache_dir / visible).iterdir()) == []
    assert list(staging.iterdir())  # the leftovers exist until the next start...
    hubd(settings, "ls", check=True)
    assert list(staging.iterdir()) == []  # ...which removes them
    pulled = hubd(settings, "pull", f"https://tfhub.dev/{path}", check=True).stdout.strip()
    assert Path(pulled, "saved_model.pb").is_file()


def test_progress_bar_is_drawn_on_a_terminal(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.01))
    code, drawn, stdout = run_on_terminal(
        [sys.executable, "-m", "hubd", "pull", f"https://tfhub.dev/{path}"], cli_env(settings)
    )
    assert code == 0
    assert b"\r\x1b[2K" in drawn and "━".encode() in drawn and b"MB/s" in drawn  # redrawn in place, with a rate
    assert Path(stdout.decode().strip(), "saved_model.pb").is_file()  # and stdout still holds only the path


def test_help_and_completion_load_no_settings_models(settings: Settings) -> None:
    """`hubd --help` and shell completion need the parser only: pydantic alone took two thirds of their start."""
    code = (
        "import sys, runpy, contextlib, io\n"
        "for argv in (['hubd', '--help'], ['hubd', 'completion', 'bash']):\n"
        "    sys.argv = argv\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        runpy.run_module('hubd', run_name='__main__')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_settings', 'aiohttp')))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(settings), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
