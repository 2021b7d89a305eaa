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


def test_gc_tuning_freezes_start_up_objects_and_keeps_collecting() -> None:
    import gc

    from sidecar.cli import _tune_gc

    before = gc.get_threshold()
    try:
        _tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        _tune_gc(50000)
        assert gc.get_threshold() == (50000, before[1], before[2])
        assert gc.get_freeze_count() > 0
        # A cycle made after the freeze is still found.
        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
