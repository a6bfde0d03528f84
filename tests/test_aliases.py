"""Aliases and pins (#13 item 7): a manifest's `name` resolves like a handle for every user; two manifests giving
one name to different models is an error naming both; `hubd rm` of a pinned model says which manifest pins it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream, cli_env
from tests.daemon import Daemon
from tests.users import LocalUser, shared_dir
from tests.workstation import cli_as, request_as, run_as_member, visible, workstation

CLIENT_RESOLVE = "import sys, hubd_client; print(hubd_client.resolve(sys.argv[1]))"


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def manifest(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def prefetch(d: Daemon, settings: Settings, path: Path) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path)}
    return subprocess.run(
        [sys.executable, "-m", "hubd", "prefetch", str(path)], env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_a_manifest_name_resolves_like_its_handle_for_every_user(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    course = manifest(tmp_path, "course.toml", f'[[model]]\nhandle = "{tfhub(path)}"\nname = "reuse128"\n')
    with shared_dir() as public, workstation(visible(settings, public), victim) as d:  # paths users can reach
        assert prefetch(d, settings, course).returncode == 0
        entry = d.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()

        by_api = request_as(victim, d, "POST", "/v1/resolve", {"handle": "reuse128"})
        assert by_api.status == 200 and by_api.json()["id"] == entry["id"]

        pulled = cli_as(victim, d, "pull", "reuse128")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip() == entry["path"]

        client = run_as_member(victim, CLIENT_RESOLVE, "reuse128", env={"HUBD_SOCKET": str(d.socket_path)})
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == entry["path"]

        listed = cli_as(victim, d, "ls")
        row = next(r for r in listed.stdout.splitlines() if r.startswith(entry["id"][:12]))
        assert "reuse128" in row
        assert d.request("GET", f"/v1/models/{entry['id']}").json()["aliases"] == ["reuse128"]


def test_a_name_that_is_no_alias_gets_the_fixed_local_path_answer(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    course = manifest(tmp_path, "course.toml", f'[[model]]\nhandle = "{tfhub(path)}"\nname = "reuse128"\n')
    with workstation(settings, victim) as d:
        assert prefetch(d, settings, course).returncode == 0
        answers = {
            probe: request_as(victim, d, "POST", "/v1/resolve", {"handle": probe}).body
            for probe in ("tests", "no-such-name", "reuse12", "./reuse128", "/reuse128")
        }
        assert len(set(answers.values())) == 1, answers  # one fixed answer: nothing is looked up on disk
        assert json.loads(next(iter(answers.values())))["error"]["code"] == "bad_handle"


def test_only_admins_give_names(settings: Settings, upstream: Upstream, victim: LocalUser) -> None:
    body = {"model": [{"handle": tfhub(upstream.publish("reusable")), "name": "hijack"}]}
    with workstation(settings, victim) as d:
        assert request_as(victim, d, "POST", "/v1/prefetch", body).status == 403
        assert request_as(victim, d, "POST", "/v1/resolve", {"handle": "hijack"}).status == 400


def test_two_manifests_giving_one_name_to_different_models_is_an_error_naming_both(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("text_embedding")
    one = manifest(tmp_path, "one.toml", f'[[model]]\nhandle = "{tfhub(first)}"\nname = "embed"\n')
    two = manifest(tmp_path, "two.toml", f'[[model]]\nhandle = "{tfhub(second)}"\nname = "embed"\n')
    with workstation(settings, victim) as d:
        assert prefetch(d, settings, one).returncode == 0
        clash = prefetch(d, settings, two)
        assert clash.returncode == 1
        error = clash.stderr.strip().splitlines()[-1]
        assert error.startswith("hubd: error:") and str(one) in error and str(two) in error, clash.stderr
        assert upstream.requests(second) == 0  # nothing of the refused manifest was fetched
        # the name still means what the first manifest said
        entry = d.request("POST", "/v1/resolve", {"handle": "embed"}).json()
        assert entry["handles"] == [f"tfhub.dev/{first}"]


def cli_as_root(settings: Settings, d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`hubd ARGS` as the test's own user (root, an admin) through the daemon `d`."""
    env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path)}
    return subprocess.run([sys.executable, "-m", "hubd", *args], env=env, capture_output=True, text=True)


def test_rm_of_a_pinned_model_needs_force_and_names_the_manifest(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    course = manifest(
        tmp_path, "course.toml", f'[[model]]\nhandle = "{tfhub(path)}"\nname = "reuse128"\npin = true\n'
    )
    with workstation(settings, victim) as d:
        assert prefetch(d, settings, course).returncode == 0
        refused = cli_as_root(settings, d, "rm", "reuse128")
        assert refused.returncode == 1
        assert refused.stderr.startswith("hubd: error:") and str(course) in refused.stderr, refused.stderr
        assert "--force" in refused.stderr
        assert d.request("POST", "/v1/resolve", {"handle": "reuse128"}).status == 200  # still there
        forced = cli_as_root(settings, d, "rm", "reuse128", "--force")
        assert forced.returncode == 0, forced.stderr
        assert d.request("GET", "/v1/models").json()["models"] == []


def test_unpin_names_what_pinned_it_and_lets_rm_go_without_force(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    course = manifest(
        tmp_path, "course.toml", f'[[model]]\nhandle = "{tfhub(path)}"\nname = "reuse128"\npin = true\n'
    )
    with workstation(settings, victim) as d:
        assert prefetch(d, settings, course).returncode == 0
        assert cli_as(victim, d, "unpin", "reuse128").returncode == 1  # admins only
        unpinned = cli_as_root(settings, d, "unpin", "reuse128")
        assert unpinned.returncode == 0, unpinned.stderr
        assert str(course) in unpinned.stdout
        removed = cli_as_root(settings, d, "rm", "reuse128")
        assert removed.returncode == 0, removed.stderr
        trail = [(r["action"], r["uid"]) for r in d.request("GET", "/v1/audit").json()["records"]]
        assert trail[-2:] == [("unpin", 0), ("delete", 0)]
