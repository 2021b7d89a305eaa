"""`sidecar serve` as operators run it: a real process, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp

from tests.conftest import ROOT, free_port


async def health(port: int) -> int | None:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return None


async def test_sigterm_turns_health_unhealthy_before_closing(database_url: str) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "SIDECAR_PORT": str(port),
           "SIDECAR_SHUTDOWN_DRAIN": "1.5"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", env=env, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(100):
            if await health(port) == 200:
                break
            await asyncio.sleep(0.1)
        assert await health(port) == 200
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.4)
        assert await health(port) == 503            # draining: still listening, unhealthy
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await health(port) is None           # then gone
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert '"msg":"draining"' in log and '"msg":"stopped"' in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
