"""Group commit for the call-control API: requests that arrive while a batch is in flight
are decided together, in arrival order, in one transaction and one commit.

One batch runs at a time per sidecar (and, through the advisory lock the batch functions
take, one at a time across replicas: sql/migrations/004_group_commit.sql). Answers and
releases go first. When both kinds wait, one batch of each goes in one transaction, events
first (`tick`, sql/functions/50_tick.sql): one round trip and one commit instead of two, and
neither kind ever waits behind the other. Without a tick runner they take turns: an event
never waits behind more than one admission batch, and a stream of events never starves
admissions. An admission
whose answer would come after Kamailio gave up (its deadline) is refused at once with
`Overloaded` (a quick 503, Kamailio's failure policy applies) instead of being decided for
nobody.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sidecar.batching")

Runner = Callable[[list[Any]], Awaitable[list[Any]]]
# events, admissions -> their results, in one transaction
TickRunner = Callable[[list[Any], list[Any]], Awaitable[tuple[list[Any], list[Any]]]]

# Seconds between a decision and Kamailio acting on it: the HTTP answer and the resumption
# of the suspended transaction. An admission is shed unless it can be decided this long
# before its deadline.
_MARGIN = 0.03
# A batch that takes longer than this is logged (WARNING): admissions are being shed.
_SLOW_BATCH = 0.1
# Transactions the wait estimate looks back on.
_SAMPLES = 15


class Overloaded(Exception):
    """The request could not be decided before its deadline."""


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future[Any]
    arrived: float
    deadline: float | None  # monotonic time after which an answer is useless
    taken: bool = False  # in a batch: decided (and maybe counted), never shed any more


@dataclass
class _Queue:
    name: str
    run: Runner
    max_batch: int
    waiting: deque[_Waiting] = field(default_factory=deque)


class Scheduler:
    """Two queues, one batch in flight: `events` (answers, releases) first; both together
    in one tick when both wait (else turns)."""

    def __init__(
        self,
        run_events: Runner,
        run_admissions: Runner,
        max_batch: int,
        on_batch: Callable[[str, int, float], None] | None = None,
        run_tick: TickRunner | None = None,
        max_events: int | None = None,
        linger: float = 0.0,
    ) -> None:
        self._events = _Queue("events", run_events, max_events or max_batch)
        self._admissions = _Queue("admissions", run_admissions, max_batch)
        self._run_tick = run_tick
        # Seconds an idle scheduler waits after the first request before it starts a batch,
        # so that the requests right behind it share the transaction (0: start at once);
        # only when requests come densely (the one before came less than that earlier): a
        # lone request, the common case at low rates, has no one behind it to wait for.
        self._linger = linger
        self._last_arrival = -1e9  # monotonic
        self._gap = 1e9  # seconds between the last two requests
        # Settled to end a linger early: a full batch of admissions is waiting already.
        self._linger_wake: asyncio.Future[Any] | None = None
        self._running: asyncio.Task[None] | None = None
        self._on_batch = on_batch
        # How long a batch takes (moving average): a queued admission is shed when what it
        # has waited plus this would pass its deadline.
        self.batch_seconds = 0.0
        # The last transactions' times (_predicted_wait), and the start of the one in flight.
        self._batch_times: deque[float] = deque(maxlen=_SAMPLES)
        self._started: float | None = None

    async def event(self, item: Any) -> Any:
        return await self._submit(self._events, item, None)

    async def events(self, items: list[Any]) -> list[Any]:
        """Several events queued together, in order (one POST of Kamailio's outbox): they
        share batches instead of waiting for one batch each."""
        loop = asyncio.get_running_loop()
        now = self._arrival()
        waiting = [_Waiting(item, loop.create_future(), now, None) for item in items]
        self._events.waiting.extend(waiting)
        self._kick()
        return list(await asyncio.gather(*(w.future for w in waiting)))

    async def admission(self, item: Any, deadline: float | None) -> Any:
        return await self._submit(self._admissions, item, deadline)

    async def _submit(self, queue: _Queue, item: Any, deadline: float | None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        now = self._arrival()
        if deadline is not None and now + self._predicted_wait(queue) > deadline:
            # The batches ahead of it would answer after Kamailio gave up: refuse it now,
            # so the work goes to admissions that can still be answered in time.
            raise Overloaded()
        waiting = _Waiting(item, future, now, deadline)
        queue.waiting.append(waiting)
        if self._linger_wake is not None and len(queue.waiting) >= queue.max_batch:
            _settle(self._linger_wake)
        timer = None
        if deadline is not None:
            # Shed while still queued once a batch could no longer answer in time (a batch
            # stuck on the database must not hold Kamailio's transactions past its timeout).
            # (At most half of what is left goes to the estimate: a stale estimate must not
            # shed a request before the scheduler has had a chance to take it.)
            budget = deadline - now - _MARGIN
            timer = loop.call_at(
                loop.time() + max(0.0, budget - min(self.batch_seconds, budget / 2)),
                self._shed, waiting,
            )
        self._kick()
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    def _arrival(self) -> float:
        now = time.monotonic()
        self._gap = now - self._last_arrival
        self._last_arrival = now
        return now

    def _predicted_wait(self, queue: _Queue) -> float:
        """How long a request joining `queue` now would wait for its answer: what is left of
        the transaction in flight, the batches of the requests ahead of it, and a margin for
        the HTTP round trip and Kamailio's resumption.

        A batch is reckoned at the median of the last transactions, not at their running
        average: one slow transaction (a checkpoint, a moment without CPU) made the average
        say 25 ms a batch and shed a backlog of 270 admissions that the next batches decided
        in 30 ms. Twice that per batch ahead: batches grow slower as the queue grows, and an
        answer that comes late is work for nothing. A batch in flight longer than usual may
        take as long again: a stuck database sheds at once. Only the work ahead of it, never
        its own: with nothing ahead the request is decided at once, so that no estimate can
        shed every admission with no batch running to put it right. (A request queued anyway
        is shed by its timer before its deadline.)"""
        usual = self._median(self._batch_times)
        wait = 2 * (len(queue.waiting) // queue.max_batch) * usual
        if self._started is not None:
            elapsed = time.monotonic() - self._started
            wait += usual - elapsed if elapsed < usual else elapsed
        return wait + _MARGIN

    @staticmethod
    def _median(samples: deque[float]) -> float:
        return statistics.median(samples) if samples else 0.0

    @staticmethod
    def _shed(waiting: _Waiting) -> None:
        if not waiting.taken:
            _settle(waiting.future, exc=Overloaded())

    def _kick(self) -> None:
        if self._running is None and (self._events.waiting or self._admissions.waiting):
            self._running = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        try:
            if self._gap < self._linger \
                    and len(self._admissions.waiting) < self._admissions.max_batch:
                # Only from idle: while a batch is in flight, what arrives waits for it anyway.
                await self._linger_a_moment()
            last: _Queue | None = None
            while True:
                if self._run_tick is not None and self._events.waiting \
                        and self._admissions.waiting:
                    await self._tick()
                    continue
                queue = self._next(last)
                last = queue
                batch = self._take(queue)
                if batch is None:
                    if not self._events.waiting and not self._admissions.waiting:
                        return
                    continue
                await self._run(queue, batch)
        finally:
            self._running = None
            self._kick()  # something may have arrived while we were finishing

    async def _linger_a_moment(self) -> None:
        """Wait the linger out, or until a full batch of admissions waits (closed-loop
        clients, 64 in flight, send a full batch at once: waiting longer would only add
        latency)."""
        loop = asyncio.get_running_loop()
        wake = self._linger_wake = loop.create_future()
        timer = loop.call_later(self._linger, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._linger_wake = None

    def _next(self, last: _Queue | None) -> _Queue:
        """Events first; when both queues wait, they take turns, so that a stream of answers
        and releases (the outbox sends them by the dozen) never starves admissions, and an
        event never waits behind more than one admission batch."""
        if not self._events.waiting:
            return self._admissions
        if self._admissions.waiting and last is self._events:
            return self._admissions
        return self._events

    def _take(self, queue: _Queue) -> list[_Waiting] | None:
        """Up to max_batch requests, in arrival order; admissions past their deadline are
        shed on the way."""
        now = time.monotonic()
        batch: list[_Waiting] = []
        while queue.waiting and len(batch) < queue.max_batch:
            w = queue.waiting.popleft()
            if w.future.done():  # the client went away
                continue
            # too late for any batch: shed (the estimate alone never sheds a taken request)
            if w.deadline is not None and now + _MARGIN > w.deadline:
                w.future.set_exception(Overloaded())
                continue
            w.taken = True
            batch.append(w)
        return batch or None

    async def _tick(self) -> None:
        """A batch of events and one of admissions in one transaction, events first. Should
        it fail, nothing of it was applied: each batch is then run on its own (with its own
        one-by-one fallback), so that one bad request fails no neighbour of either kind."""
        assert self._run_tick is not None
        events = self._take(self._events)
        admissions = self._take(self._admissions)
        if not events or not admissions:  # the other kind was all shed or gone meanwhile
            for queue, batch in ((self._events, events), (self._admissions, admissions)):
                if batch:
                    await self._run(queue, batch)
            return
        started = self._started = time.monotonic()
        try:
            ev_results, adm_results = await self._run_tick(
                [w.item for w in events], [w.item for w in admissions])
        except Exception as exc:  # noqa: BLE001 - decided again apart below
            log.warning("tick failed, deciding each kind apart",
                        extra={"events": len(events), "admissions": len(admissions),
                               "error": repr(exc)})
            await self._run(self._events, events)
            await self._run(self._admissions, admissions)
            return
        for w, result in zip(events, ev_results, strict=True):
            _settle(w.future, result=result)
        for w, result in zip(admissions, adm_results, strict=True):
            _settle(w.future, result=result)
        took = time.monotonic() - started
        self._took("tick", len(events) + len(admissions), took)
        if self._on_batch is not None:
            self._on_batch("events", len(events), took)
            self._on_batch("admissions", len(admissions), took)

    async def _run(self, queue: _Queue, batch: list[_Waiting]) -> None:
        started = self._started = time.monotonic()
        try:
            results = await queue.run([w.item for w in batch])
        except Exception as exc:  # noqa: BLE001 - decided again one by one below
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
            else:
                # One bad request must not fail its neighbours: each on its own.
                log.warning("batch failed, deciding one by one",
                            extra={"queue": queue.name, "size": len(batch), "error": repr(exc)})
                for w in batch:
                    try:
                        [result] = await queue.run([w.item])
                    except Exception as one_exc:  # noqa: BLE001 - reported to its caller
                        _settle(w.future, exc=one_exc)
                    else:
                        _settle(w.future, result=result)
        else:
            for w, result in zip(batch, results, strict=True):
                _settle(w.future, result=result)
        took = time.monotonic() - started
        self._took(queue.name, len(batch), took)
        if self._on_batch is not None:
            self._on_batch(queue.name, len(batch), took)

    def _took(self, name: str, size: int, took: float) -> None:
        """A batch's time: the estimates that shed admissions, and a warning when slow."""
        if took > _SLOW_BATCH:
            log.warning("slow batch", extra={
                "queue": name, "size": size, "seconds": round(took, 3),
                "waiting": len(self._events.waiting) + len(self._admissions.waiting)})
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * took
        self._batch_times.append(took)
        self._started = None


def _settle(
    future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
