"""schemathesis against the daemon's own OpenAPI document: no 5xx, every response as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.server.routes_table import ROUTES
from tests.conftest import Upstream
from tests.daemon import start_daemon

# What the API promises: never a server error, and every status, content type, header and body as documented.
# (positive_data_acceptance does not apply: whether a schema-valid handle string is acceptable depends on the
# configured upstream allowlist, so "0" or "https://0" are rightly 400s.)
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.slow
def test_api_fuzz_finds_no_server_errors(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    upstream.publish("reusable", path="fuzz/model/1")  # something real to find among the noise
    daemon = start_daemon(settings, tmp_path, "--listen", "127.0.0.1:0")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{daemon.tcp[0]}/v1/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                "40",
                "--seed",
                "20261124",
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=280,
            cwd=tmp_path,  # schemathesis keeps a crash cache in the working directory
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        # every operation of the document but GET /v1/openapi.json, which schemathesis leaves out (it loaded it)
        assert f"Tested: {len(ROUTES) - 1}" in result.stdout
        assert "unexpected error" not in daemon.log()  # the 500 handler logs this; aiohttp logs its own 400s
    finally:
        daemon.stop()
