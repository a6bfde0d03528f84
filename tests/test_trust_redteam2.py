"""A second red-team pass, after the route table, the CLI's backends, paginated listings, the bounded watcher,
parallel inflate and the index's totals landed. Each attack is performed against a real daemon (by an
unprivileged local user where the attack is theirs) and shown to fail:

1. a module planted in the daemon's working directory is never imported by the parallel-inflate child;
"""

from __future__ import annotations

import gzip
import io
import tarfile
import uuid
from pathlib import Path

import pytest

from hubd import parallel_inflate
from hubd.config import Settings
from tests.daemon import start_daemon
from tests.hosting import HostingServer
from tests.users import LocalUser, needs_root

pytestmark = [needs_root]


def archive(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)


SMALL_MODEL = {"saved_model.pb": b"\x08\x01graph"}


# -- 1. the parallel-inflate child's import path ----------------------------------------------------------------

# Run as the attacker: a directory holding a `rapidgzip` module that, when imported, records the uid it ran as
# next to itself (the daemon itself never imports rapidgzip: only its child does).
PLANT_MODULES = r"""
import os, sys
folder = sys.argv[1]
os.mkdir(folder, 0o755)
payload = (
    "import os\n"
    "open(os.path.join(os.path.dirname(__file__), 'PWNED-' + __name__), 'w').write(str(os.getuid()))\n"
)
with open(os.path.join(folder, "rapidgzip.py"), "w") as f:
    f.write(payload)
os.chmod(folder, 0o777)  # so the daemon (root here) can leave its marker; the attacker needs nothing of it
"""


@pytest.mark.skipif(not parallel_inflate.available(), reason="rapidgzip is not installed")
def test_the_inflate_child_never_imports_from_the_daemons_working_directory(
    settings: Settings, hosting: HostingServer, attacker: LocalUser, tmp_path: Path
) -> None:
    """`python -c` puts the working directory first on sys.path: a daemon (or `hubd pull` with no daemon) started
    in a directory another user can write would run that user's `rapidgzip.py` as itself on its next large
    download (on 4 cores or more, every announced download of 32 MiB or more takes the parallel path)."""
    planted = Path(f"/tmp/hubd-planted-{uuid.uuid4().hex[:8]}")
    done = attacker.python(PLANT_MODULES, str(planted))
    assert done.returncode == 0, done.stderr
    path = hosting.add(f"redteam2/{uuid.uuid4().hex[:8]}/1", archive(SMALL_MODEL))
    try:
        daemon = start_daemon(
            settings, tmp_path, env_extra={"HUBD_INFLATE_THREADS": "2"}, popen_extra={"cwd": str(planted)}
        )
        try:
            reply = daemon.request("POST", "/v1/resolve", {"handle": path})
        finally:
            daemon.stop()
        assert reply.status == 200, reply.body
        assert sorted(p.name for p in planted.iterdir() if p.name.startswith("PWNED")) == []
        assert "gave no verdict" not in daemon.log()  # the real rapidgzip inflated it
    finally:
        for child in planted.iterdir():
            child.unlink()
        planted.rmdir()
