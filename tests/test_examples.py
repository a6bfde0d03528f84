"""The README's quickstart runs as written, offline."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_quickstart_trains_a_text_classifier_through_hubd() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TF_USE_LEGACY"))}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolved https://tfhub.dev/demo/text-embedding/1 -> " in result.stdout
    assert "accuracy 1.00" in result.stdout
