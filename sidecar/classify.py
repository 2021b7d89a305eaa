"""Classification of a call from a cache of the configuration: who calls, which legs, which
counters and channels each leg needs. The same rules as call_origin() and call_legs() in
sql/functions/20_admission.sql, read top to bottom in the same order (tests/test_classify.py
holds the two to the same answers); PostgreSQL is then left only the counting
(admit_planned()).

The cache is one immutable `Config`, loaded in one snapshot with the configuration's
generation (migration 012), and replaced whole when PostgreSQL announces a change
(`ConfigFollower`, LISTEN sidecar_config). A decision never rests on a stale cache: the
transaction that counts a call compares the cache's generation with its own and classifies
the call itself when they differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("sidecar.classify")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PHONE = re.compile(r"\+?[0-9*#]{1,32}")
# account_chain()'s guard against a loop a deferred check has not refused yet.
_CHAIN_MAX = 1001

FORBIDDEN = '{"action": "reject", "why": "forbidden"}'
CHALLENGE = '{"action": "challenge"}'
NOT_FOUND = '{"action": "reject", "why": "not_found"}'


def is_phone(user: str | None) -> bool:
    """A phone number: what alone may leave through a channel (is_phone())."""
    return user is not None and _PHONE.fullmatch(user) is not None


@dataclass(frozen=True)
class Extension:
    id: str
    account: str
    has_ha1: bool
    contact: str | None
    sources: tuple[IPNetwork, ...]
    forward: tuple[str, ...]
    ring_self: bool


@dataclass(frozen=True)
class Channel:
    id: str
    rank: int  # its place in ORDER BY priority, id, as PostgreSQL's collation sorts the ids
    sources: tuple[IPNetwork, ...]
    prefixes: tuple[str, ...]
    routable: bool  # has a gateway


@dataclass(frozen=True)
class Plan:
    """One call classified: a verdict alone (challenge, forbidden, not_found, as the
    decision's JSON), or the origin and the legs (planned_leg rows, as dicts)."""

    verdict: str | None
    origin: str | None
    legs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Config:
    """The configuration as of `generation`, indexed for classification."""

    generation: int
    parents: dict[str, str | None]
    extensions: dict[str, Extension]
    numbers: dict[str, str]
    # extensions with source addresses, in id order; channels in (priority, id) order
    sourced: tuple[Extension, ...]
    channels: tuple[Channel, ...]

    def chain(self, account: str | None) -> list[str]:
        """The account and its ancestors, nearest first (account_chain())."""
        out: list[str] = []
        while account is not None and account in self.parents:
            out.append(account)
            if len(out) >= _CHAIN_MAX:
                break
            account = self.parents[account]
        return out

    def local(self, user: str) -> Extension | None:
        """The extension a user part names: its id, or a number routed to it."""
        ext = self.extensions.get(user)
        if ext is None and user in self.numbers:
            ext = self.extensions.get(self.numbers[user])
        return ext

    def candidates(self, number: str) -> list[str]:
        """Channels that may carry a call to `number`: longest matching prefix first, then
        priority, then id (channel_candidates())."""
        found = []
        for ch in self.channels:
            if not ch.routable:
                continue
            best = max((len(p) for p in ch.prefixes if number.startswith(p)), default=None)
            if best is not None:
                found.append((-best, ch.rank, ch.id))
        return [cid for _, _, cid in sorted(found)]

    def origin(self, source: str, from_user: str | None,
               auth_user: str | None) -> tuple[Extension | None, str | None, str | None]:
        """Who is calling (call_origin()): (extension, channel, verdict)."""
        if auth_user is not None:
            ext = self.extensions.get(auth_user)
            if ext is not None and ext.has_ha1:
                return ext, None, None
            return None, None, FORBIDDEN
        addr = _address(source)
        named = self.extensions.get(from_user) if from_user is not None else None
        if named is not None and _within(addr, named.sources):
            return named, None, None
        for ch in self.channels:
            if _within(addr, ch.sources):
                return None, ch.id, None
        for ext in self.sourced:
            if _within(addr, ext.sources):
                return ext, None, None
        if named is not None and named.has_ha1:
            return None, None, CHALLENGE
        return None, None, FORBIDDEN

    def plan(self, source: str, from_user: str | None, to_user: str,
             auth_user: str | None, call_no: int) -> Plan:
        """One call classified, its legs numbered for its place in the batch."""
        ext, chan, verdict = self.origin(source, from_user, auth_user)
        if verdict is not None:
            return Plan(verdict, None, ())
        origin = f"extension:{ext.id}" if ext is not None else f"channel:{chan}"
        legs = self.legs(ext, chan, to_user)
        if legs is None:
            return Plan(NOT_FOUND, origin, ())
        for leg in legs:
            leg["call_no"] = call_no
        return Plan(None, origin, tuple(legs))

    def legs(self, caller: Extension | None, in_chan: str | None,
             to_user: str) -> list[dict[str, Any]] | None:
        """The legs of a call, in order (call_legs()): leg 0 to what was dialled; when the
        destination forwards, one per forward target and ring_self last. None when nothing
        can be reached."""
        dest = self.local(to_user)
        accounts = self.chain(caller.account) if caller is not None else None
        if dest is None and (in_chan is not None or not is_phone(to_user)):
            return None
        first = self._leg(0, accounts, in_chan, dest, to_user, accounts or [])
        if first is None:
            return None
        forwards = dest is not None and (len(dest.forward) > 0 or dest.ring_self)
        first["rings"] = not forwards
        out = [first]
        if dest is not None and forwards:
            dest_chain = self.chain(dest.account)
            n = 0
            for target in dest.forward:
                n += 1
                leg = self._leg(n, dest_chain, None, self.local(target), target, accounts)
                if leg is not None:
                    out.append(leg)
            if dest.ring_self:
                leg = self._leg(n + 1, dest_chain, None, dest, None, accounts)
                if leg is not None:
                    out.append(leg)
        return out

    def _leg(self, n: int, from_chain: list[str] | None, in_chan: str | None,
             to: Extension | None, number: str | None,
             origin_accounts: list[str] | None) -> dict[str, Any] | None:
        """One leg (plan_leg()); None when it is an external end no channel carries."""
        cls = "internal" if from_chain is not None and to is not None else "public"
        if in_chan is not None:
            chans = [in_chan]
        elif to is None and is_phone(number):
            assert number is not None
            chans = self.candidates(number)
        else:
            chans = []
        if to is None and not chans:
            return None
        to_chain = self.chain(to.account) if to is not None else []
        keys: list[str] = []
        for acc in (from_chain or []) + to_chain:
            for key in (f"account:{acc}:calls", f"account:{acc}:{cls}"):
                if key not in keys:
                    keys.append(key)
        return {
            "leg": n,
            "to_ext": to.id if to is not None else None,
            "number": number if to is None else None,
            "class": cls,
            "keys": keys,
            "chans": chans,
            "rings": True,
            "contact": to.contact if to is not None else None,
            "origin_accounts": origin_accounts,
        }


@functools.lru_cache(maxsize=4096)
def _address(source: str) -> IPAddress:
    """A source address parsed (cached: callers come back, and parsing is most of what
    matching a source costs; bounded, as sources over UDP can be forged)."""
    return ipaddress.ip_address(source)


def _within(addr: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    # (PostgreSQL's <<= is false across address families; so is `in`.)
    return any(addr in net for net in nets)


def _nets(values: list[Any] | None) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(str(v)) for v in values or ())


# One snapshot: the generation and the tables it describes (migration 012).
_LOAD = {
    "generation": "SELECT n FROM config_generation",
    "accounts": "SELECT id::text, parent::text FROM accounts",
    "extensions": """SELECT id::text, account::text, ha1 IS NOT NULL AS has_ha1, contact,
                            sources::text[] AS sources, forward, ring_self
                     FROM extensions ORDER BY id""",
    "numbers": "SELECT number, extension::text FROM numbers",
    "channels": """SELECT id::text, sources::text[] AS sources, prefixes::text[] AS prefixes,
                          gateway IS NOT NULL AS routable
                   FROM channels ORDER BY priority, id""",
}


async def load(conn: asyncpg.Connection) -> Config:
    """The configuration as one transaction sees it (REPEATABLE READ: one snapshot)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        generation = await conn.fetchval(_LOAD["generation"])
        accounts = await conn.fetch(_LOAD["accounts"])
        ext_rows = await conn.fetch(_LOAD["extensions"])
        numbers = await conn.fetch(_LOAD["numbers"])
        chan_rows = await conn.fetch(_LOAD["channels"])
    extensions = {
        r["id"]: Extension(r["id"], r["account"], r["has_ha1"], r["contact"],
                           _nets(r["sources"]), tuple(r["forward"]), r["ring_self"])
        for r in ext_rows
    }
    return Config(
        generation=generation,
        parents={r["id"]: r["parent"] for r in accounts},
        extensions=extensions,
        numbers={r["number"]: r["extension"] for r in numbers},
        sourced=tuple(extensions[r["id"]] for r in ext_rows if r["sources"]),
        channels=tuple(Channel(r["id"], i, _nets(r["sources"]), tuple(r["prefixes"]),
                               r["routable"]) for i, r in enumerate(chan_rows)),
    )


def planned_batch(config: Config | None, items: list[Any]) -> tuple[
        int | None, str, list[str | None], list[str | None]]:
    """What admit_planned() takes for a batch of admissions (AdmitRequest): the generation,
    every leg as a JSON array, and per call its verdict and origin. With no cache, no
    generation: PostgreSQL classifies."""
    if config is None:
        n = len(items)
        return None, "[]", [None] * n, [None] * n
    legs: list[dict[str, Any]] = []
    verdicts: list[str | None] = []
    origins: list[str | None] = []
    for i, item in enumerate(items, start=1):
        plan = config.plan(item.source, item.from_user, item.to_user, item.auth_user, i)
        verdicts.append(plan.verdict)
        origins.append(plan.origin)
        legs.extend(plan.legs)
    return config.generation, orjson.dumps(legs).decode(), verdicts, origins


class ConfigFollower:
    """The cache, kept current: a connection of its own LISTENs on sidecar_config and the
    whole configuration is read again after every change (changes that arrive during a
    reload are folded into one more). While the connection is down the cache is dropped
    and admissions are classified by PostgreSQL; it comes back with the connection."""

    def __init__(self, connect: Callable[[], Any], retry_seconds: float = 1.0) -> None:
        self._connect = connect
        self._retry = retry_seconds
        self.config: Config | None = None
        self.reloads = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="config-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with self._connection() as conn:
                    while True:
                        self._changed.clear()
                        config = await load(conn)
                        if self.config is None or config.generation != self.config.generation:
                            log.info("configuration cached", extra={
                                "generation": config.generation,
                                "extensions": len(config.extensions),
                                "channels": len(config.channels)})
                        self.config = config
                        self.reloads += 1
                        await self._changed.wait()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError) as exc:
                self.config = None
                log.warning("configuration cache lost: PostgreSQL classifies meanwhile",
                            extra={"error": str(exc) or type(exc).__name__})
                await asyncio.sleep(self._retry)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await self._connect()

        def changed(*_args: Any) -> None:
            # a change announced, or the connection gone: the reload that follows tells
            self._changed.set()

        try:
            conn.add_termination_listener(changed)
            await conn.add_listener("sidecar_config", changed)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
