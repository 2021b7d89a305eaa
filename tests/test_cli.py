"""The operator's command line against real PostgreSQL: `sidecar usage`, `sidecar calls`,
`sidecar release CALL_ID` (and import/export round trip), run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import running_sidecar
from tests.test_admin_resources import BASE

ROOT = Path(__file__).resolve().parent.parent


async def sidecar_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "SIDECAR_LOG_LEVEL": "WARNING"}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_usage_calls_release(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        assert (await sc.admit("cli-1", to="ivr", source="127.0.0.3"))["action"] == "relay"
        assert (await sc.admit("cli-2", to="ivr", source="127.0.0.3"))["action"] == "relay"
        await sc.answer("cli-1", 0)

        res = await sidecar_cli(database_url, "usage")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].split() == ["KIND", "ID", "CALLS", "PUBLIC", "INTERNAL"]
        rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:]}
        assert rows[("account", "acme")] == ["2/100", "2/∞", "0/∞"]
        assert rows[("account", "acme-sales")] == ["0/∞", "0/10", "0/5"]
        assert rows[("channel", "carrier-a")] == ["2/30"]
        res = await sidecar_cli(database_url, "usage", "--json")
        assert json.loads(res.stdout) == await sc.usage()

        res = await sidecar_cli(database_url, "calls")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].split()[:2] == ["STATE", "SINCE"]
        assert [(ln.split()[0], ln.split()[-1]) for ln in lines[1:]] == [
            ("answered", "cli-1"),
            ("ringing", "cli-2"),
        ]
        res = await sidecar_cli(database_url, "calls", "--state", "ringing", "--json")
        assert [c["call_id"] for c in json.loads(res.stdout)] == ["cli-2"]
        res = await sidecar_cli(database_url, "calls", "--account", "acme-sales", "--json")
        assert json.loads(res.stdout) == []

        res = await sidecar_cli(database_url, "release", "cli-2")
        assert (res.returncode, res.stdout.strip()) == (0, "released 1 call(s)")
        res = await sidecar_cli(database_url, "release", "cli-2")
        assert (res.returncode, res.stdout.strip()) == (1, "released 0 call(s)")
        res = await sidecar_cli(database_url, "release", "cli-1", "--from-tag", "other")
        assert res.returncode == 1
        usage = await sc.usage()
        assert usage["accounts"]["acme"]["calls"]["active"] == 1
        assert usage["channels"]["carrier-a"]["calls"]["active"] == 1


async def test_import_export_and_errors(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE))
    res = await sidecar_cli(database_url, "import", str(path), "--dry-run")
    assert res.returncode == 0 and res.stdout.startswith("dry run"), res.stderr
    res = await sidecar_cli(database_url, "import", str(path))
    assert res.returncode == 0, res.stderr
    res = await sidecar_cli(database_url, "export")
    exported = json.loads(res.stdout)
    assert exported["accounts"] == BASE["accounts"]
    # The same document and schema as PUT /v1/config.
    async with running_sidecar(database_url) as sc:
        status, doc = await sc.request("GET", "/v1/config")
        assert (status, doc) == (200, exported)

    path.write_text(json.dumps({"accounts": [{"id": "a", "parent": "ghost"}]}))
    res = await sidecar_cli(database_url, "import", str(path))
    assert res.returncode == 1 and "$.accounts[0].parent" in res.stderr
    res = await sidecar_cli(
        "postgresql://postgres@127.0.0.1:1/none", "usage"
    )  # nothing listens on port 1
    assert res.returncode == 2 and "cannot reach PostgreSQL" in res.stderr
