"""Attacks on the late changes: `hubd rm` finding a model's refs and tfhub_modules/ links by its names (b779f9e),
`GET /v1/models?name=` and the CLI's use of it (8efa676). Real daemons, a real hosting server, real unprivileged
users; each test is a finding and fails until it is fixed."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from hubd.config import Settings
from hubd.tfhub_view import link_name
from tests import hostile
from tests.conftest import Upstream, cli_env
from tests.daemon import Daemon, start_daemon
from tests.users import LocalUser
from tests.workstation import request_as, workstation


def _model(seed: bytes) -> bytes:
    """A small SavedModel-shaped archive whose tree (and so id) differs by `seed`."""
    return hostile._tar(
        [
            *hostile.saved_model_members(),
            hostile._file("variables/variables.index", b"index"),
            hostile._file("variables/variables.data-00000-of-00001", hashlib.sha256(seed).digest() * 64),
        ]
    )


def _repacked(archive: bytes) -> bytes:
    """The same tar, gzipped again: another archive sha256, the same tree (an upstream re-packing its files)."""
    again = gzip.compress(gzip.decompress(archive), compresslevel=1, mtime=12345)
    assert again != archive
    return again


def _links_to(cache: Path, digest: str) -> list[str]:
    view = cache / "tfhub_modules"
    return sorted(p.name for p in view.iterdir() if p.is_symlink() and os.readlink(p) == f"../objects/{digest}")


def _resolve(daemon: Daemon, handle: str, sha256: str | None = None) -> str:
    reply = daemon.request("POST", "/v1/resolve", {"handle": handle, "sha256": sha256})
    assert reply.status == 200, reply.body
    return str(reply.json()["id"])


# -- hubd rm: the links it no longer finds ------------------------------------------------------------------------


def test_rm_leaves_no_tfhub_link_at_the_removed_model_after_its_ref_was_fetched_again_under_another_spelling(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    """tensorflow_hub users often write `...?tf-hub-format=compressed`; hubd links that spelling too. A later
    fetch of the same handle (here: a sha256 pin for the upstream's re-packed archive, which any user may ask for)
    publishes the same tree and rewrites the ref with the handle it was given this time. `hubd rm` now unlinks
    only the spellings of the refs it finds, so the first spelling's links survive the removal, pointing at the
    removed object; the full scan before b779f9e removed them. Once the handle names another model and anything
    publishes the old tree again, tensorflow_hub loads the old model for that spelling while hubd resolves the
    handle to the new one."""
    first = _model(b"stale-spelling")
    path = upstream.publish(first)
    spelled = f"https://tfhub.dev/{path}?tf-hub-format=compressed"
    plain = f"https://tfhub.dev/{path}"
    daemon = start_daemon(settings, tmp_path)
    try:
        old = _resolve(daemon, spelled)
        upstream.server.add(path, _repacked(first))
        assert _resolve(daemon, plain, hashlib.sha256(_repacked(first)).hexdigest()) == old
        assert daemon.request("DELETE", f"/v1/models/{old}").status == 200
        assert _links_to(settings.cache_dir, old) == []
        # What the stale link does next: the handle moves on, and another handle publishes the old tree.
        upstream.server.add(path, _model(b"the handle's next model"))
        new = _resolve(daemon, plain)
        assert _resolve(daemon, f"https://tfhub.dev/{upstream.publish(first)}") == old
        link = settings.cache_dir / "tfhub_modules" / link_name(spelled)
        assert not link.is_symlink() or os.readlink(link) == f"../objects/{new}"
    finally:
        daemon.stop()


# -- GET /v1/models?name=: what an unprivileged caller gets out of it ---------------------------------------------


def test_models_by_name_tells_no_user_what_exists_where_only_the_daemon_can_look(
    settings: Settings, upstream: Upstream, attacker: LocalUser, tmp_path: Path
) -> None:
    """/v1/resolve, /v1/pull, /v1/prefetch and /v1/verify refuse local paths from their text alone
    (`_remote_only`): parse_handle stats a local path, and its answer told any socket user whether a directory
    exists where they cannot look. `?name=` passes the name to Engine.find, which parses it: an existing
    directory in root's private tree answers 200 with no models, a missing one 400 naming it."""
    private = tmp_path / "private"
    (private / "present").mkdir(parents=True)
    private.chmod(0o700)
    looked = attacker.python(f"import os; print(os.path.isdir({str(private / 'present')!r}))")
    assert looked.stdout.strip() == "False", looked.stderr  # the attacker cannot see it for itself
    with workstation(settings, attacker) as d:
        answers = [
            request_as(attacker, d, "GET", "/v1/models?name=" + quote(str(private / name), safe=""))
            for name in ("present", "absent")
        ]
    assert (answers[0].status, answers[0].body) == (answers[1].status, answers[1].body), answers


def test_models_by_name_never_answers_500_for_a_name_the_path_parser_chokes_on(
    settings: Settings, upstream: Upstream, attacker: LocalUser
) -> None:
    """`~` followed by a NUL reaches os.path.expanduser, whose ValueError (embedded null byte) nothing catches:
    a 500 and a traceback in the daemon's log for any socket user, on every request."""
    with workstation(settings, attacker) as d:
        reply = request_as(attacker, d, "GET", "/v1/models?name=~%00")
        log = d.log()
    assert reply.status < 500, (reply.body, log[-2000:])
    assert "Traceback" not in log, log[-2000:]


def test_hubd_rm_of_a_handle_with_credentials_never_sends_them_to_the_daemon(
    settings: Settings, tmp_path: Path
) -> None:
    """Handles with user:password@ are refused because they would be kept and shown to others. The CLI used to
    refuse one itself (it listed the models, then parsed the handle); it now sends the name to the daemon first,
    in the query string, which the daemon's access log (HUBD_LOG_LEVEL=debug) writes out in full."""
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_LOG_LEVEL": "debug"})
    try:
        env = {**cli_env(settings), "HUBD_SOCKET": str(daemon.socket_path)}
        rm = [sys.executable, "-m", "hubd", "rm", "https://alice:s3cr3t-pw@tfhub.dev/a/b/1"]
        refused = subprocess.run(rm, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "credentials" in refused.stderr, refused.stderr
        assert daemon.request("GET", "/v1/health").status == 200
    finally:
        daemon.stop()  # every line is written once it has exited
    assert "hubd.access" in daemon.log()  # the access log was on
    assert "s3cr3t" not in daemon.log(), [line for line in daemon.log().splitlines() if "s3cr3t" in line]
