"""What `hubd` shows a person at a terminal: rich progress with rate and ETA, NO_COLOR, --quiet, results on
their own lines, shell completion."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hubd.config import Settings
from tests.conftest import Upstream, cli_env, run_on_terminal
from tests.hosting import Behaviour

SLOW = Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.01)
SGR = re.compile(rb"\x1b\[([0-9;]*)m")


def pull(upstream: Upstream) -> list[str]:
    return [sys.executable, "-m", "hubd", "pull", f"https://tfhub.dev/{upstream.publish('large_4mb', SLOW)}"]


def run_all_on_terminal(cmd: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run `cmd` with stdout and stderr on one pseudo-terminal, as in a shell: (exit code, what it showed)."""
    code, shown, _ = run_on_terminal(cmd, env, stdout_too=True)
    return code, shown


def test_the_bar_shows_rate_and_time_remaining(settings: Settings, upstream: Upstream) -> None:
    code, drawn, stdout = run_on_terminal(pull(upstream), cli_env(settings))
    assert code == 0
    assert b"\r\x1b[2K" in drawn and "━".encode() in drawn  # redrawn in place
    assert b"MiB" in drawn and re.search(rb"\d MB/s", drawn)  # bytes and rate
    assert re.search(rb"\d:\d\d:\d\d", drawn)  # time remaining
    assert Path(stdout.decode().strip(), "saved_model.pb").is_file()


def test_the_printed_path_never_lands_on_the_bar_line(settings: Settings, upstream: Upstream) -> None:
    code, shown = run_all_on_terminal(pull(upstream), cli_env(settings))
    assert code == 0
    lines = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", shown).replace(b"\r\n", b"\n").split(b"\n")
    paths = [line for line in lines if str(settings.cache_dir).encode() + b"/objects/" in line]
    assert len(paths) == 1 and paths[0].startswith(str(settings.cache_dir).encode()), shown[-500:]


def test_no_color_draws_the_bar_without_colours(settings: Settings, upstream: Upstream) -> None:
    code, drawn, _ = run_on_terminal(pull(upstream), {**cli_env(settings), "NO_COLOR": "1"})
    assert code == 0 and "━".encode() in drawn
    colours = [p for p in SGR.findall(drawn) if any(re.fullmatch(rb"3\d|4\d|9\d|10\d", x) for x in p.split(b";"))]
    assert colours == []
    _, coloured, _ = run_on_terminal(pull(upstream), cli_env(settings))
    assert any(SGR.findall(coloured))


def test_quiet_draws_no_progress(settings: Settings, upstream: Upstream) -> None:
    code, drawn, stdout = run_on_terminal([*pull(upstream), "--quiet"], cli_env(settings))
    assert code == 0
    assert "━".encode() not in drawn and b"download" not in drawn
    assert Path(stdout.decode().strip(), "saved_model.pb").is_file()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_name_every_command(shell: str) -> None:
    script = subprocess.run(
        [sys.executable, "-m", "hubd", "completion", shell], capture_output=True, text=True, check=True
    ).stdout
    for command in ("serve", "pull", "prefetch", "ls", "verify", "gc", "status", "rm", "config", "completion"):
        assert command in script
    if shutil.which(shell):
        subprocess.run([shell, "-n"], input=script, text=True, check=True)  # it parses


def hubd_json(settings: Settings, *args: str) -> tuple[int, list[Any]]:
    """Run `hubd ... --json`: its exit code and the JSON objects it printed (one document, or NDJSON lines)."""
    result = subprocess.run(
        [sys.executable, "-m", "hubd", *args, "--json"], env=cli_env(settings), capture_output=True, text=True
    )
    try:
        return result.returncode, [json.loads(result.stdout)]
    except json.JSONDecodeError:
        return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_pull_and_prefetch_json_stream_ndjson_events(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    handle = f"https://tfhub.dev/{upstream.publish('reusable')}"
    code, events = hubd_json(settings, "pull", handle)
    assert code == 0 and {e["event"] for e in events[:-1]} == {"progress"}
    assert events[-1]["event"] == "done" and Path(events[-1]["entry"]["path"], "saved_model.pb").is_file()
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[[model]]\nhandle = "{handle}"\n[[model]]\nhandle = "{handle}9"\n')
    code, events = hubd_json(settings, "prefetch", str(manifest), "--no-daemon")
    assert code == 1
    by_handle = {e["handle"]: e for e in events if e["event"] in ("done", "error")}
    assert by_handle[handle]["event"] == "done" and by_handle[f"{handle}9"]["error"]["code"]


@pytest.mark.slow
def test_every_command_answers_json_and_errors_carry_the_api_code(settings: Settings, upstream: Upstream) -> None:
    hubd_json(settings, "pull", f"https://tfhub.dev/{upstream.publish('reusable')}")
    code, [models] = hubd_json(settings, "ls")
    assert code == 0 and len(models) == 1
    code, [verified] = hubd_json(settings, "verify")
    assert code == 0 and [(r["id"], r["problems"]) for r in verified["results"]] == [(models[0]["id"], [])]
    code, [plan] = hubd_json(settings, "gc", "--dry-run")
    assert code == 0 and plan["dry_run"] is True
    code, [status] = hubd_json(settings, "status")
    assert code == 0 and status["entries"] == 1
    code, [removed] = hubd_json(settings, "rm", models[0]["id"])
    assert code == 0 and removed["id"] == models[0]["id"]
    code, [error] = hubd_json(settings, "rm", models[0]["id"])
    assert code == 1 and error["error"]["code"] == "unknown_model" and error["error"]["message"]
    code, [error] = hubd_json(settings, "pull", "/not/a/remote/handle")
    assert code == 1 and error["event"] == "error" and error["error"]["code"]


def test_export_import_and_unpin_answer_json(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    handle = f"https://tfhub.dev/{upstream.publish('reusable')}"
    bundle = tmp_path / "models.tar"
    code, [exported] = hubd_json(settings, "export", str(bundle), handle)
    assert code == 0 and exported["bundle"] == str(bundle) and exported["size_bytes"] == bundle.stat().st_size
    assert [m["handles"] for m in exported["models"]] == [[handle]]
    elsewhere = settings.model_copy(update={"cache_dir": tmp_path / "elsewhere"})
    code, events = hubd_json(elsewhere, "import", str(bundle))
    assert code == 0 and [e["event"] for e in events] == ["entry", "done"]
    assert events[0]["digest"] == exported["models"][0]["id"] and events[1] == {
        "event": "done",
        "imported": 1,
        "refused": 0,
    }
    code, [unpinned] = hubd_json(elsewhere, "unpin", handle)
    assert code == 0 and unpinned == {"handle": handle, "unpinned": False, "pinned_by": []}
