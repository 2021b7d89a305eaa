"""Typed application state keys (web.AppKey)."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from .batching import Scheduler
from .classify import ConfigFollower
from .metrics import Metrics
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
METRICS = web.AppKey("metrics", Metrics)
# Set when the server is shutting down: /health turns 503 so balancers move away first.
STOPPING = web.AppKey("stopping", asyncio.Event)
# Group commit of the call-control requests (batching.py).
SCHEDULER = web.AppKey("scheduler", Scheduler)
# The configuration cache that classifies admissions (classify.py), when it is on.
CONFIG = web.AppKey("config", ConfigFollower)
