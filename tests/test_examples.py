"""examples/ run as a user runs them: offline, from the installed packages, without a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_trains_a_text_classifier_through_hubd_from_the_installed_packages(tmp_path: Path) -> None:
    """Copied out of the checkout and run there with PYTHONPATH unset: only installed packages can be imported."""
    script = shutil.copy(REPO / "examples" / "quickstart.py", tmp_path / "quickstart.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TF_USE_LEGACY", "PYTHONPATH"))}
    checkout_only = subprocess.run(
        [sys.executable, "-c", "import tests"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "No module named 'tests'" in checkout_only.stderr  # the checkout is not on the path
    result = subprocess.run(
        [sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolved https://tfhub.dev/demo/text-embedding/1 -> " in result.stdout
    assert "accuracy 1.00" in result.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "quickstart.py"]  # nothing left behind
