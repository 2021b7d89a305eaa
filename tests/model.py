"""A small pure-Python reference model of the counting rules (SPEC sections 2 to 8).

Written from the SPEC, not from the SQL: the property test checks that PostgreSQL's
admission functions and this model agree on every decision and every counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PHONE = re.compile(r"^\+?[0-9*#]{1,32}$")


@dataclass
class Config:
    counting: str
    accounts: dict[str, dict[str, Any]]     # id -> {"parent": ..., "limits": {...}}
    extensions: dict[str, dict[str, Any]]   # id -> {"account", "forward", "ring_self", ...}
    numbers: dict[str, str]                 # number -> extension
    channels: dict[str, dict[str, Any]]     # id -> {"limit", "prefixes", "priority", "sources"}

    def chain(self, ext: str) -> list[str]:
        out, acc = [], self.extensions[ext]["account"]
        while acc is not None:
            out.append(acc)
            acc = self.accounts[acc].get("parent")
        return out

    def limit(self, key: str) -> int | None:
        kind, ident, dim = key.split(":")
        if kind == "channel":
            return self.channels[ident].get("limit")
        return self.accounts[ident].get("limits", {}).get(dim)

    def candidates(self, number: str) -> list[str]:
        found = []
        for cid, ch in self.channels.items():
            matches = [len(p) for p in ch["prefixes"] if number.startswith(p)]
            if matches and ch.get("gateway"):
                found.append((-max(matches), ch.get("priority", 0), cid))
        return [cid for _, _, cid in sorted(found)]

    def local(self, user: str) -> str | None:
        if user in self.extensions:
            return user
        return self.numbers.get(user)


@dataclass
class Call:
    legs: dict[int, list[str]] = field(default_factory=dict)   # admitted leg -> its keys
    state: str = "ringing"
    decision: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return {k for ks in self.legs.values() for k in ks}


RELEASED = {"action": "reject", "why": "released"}


class Model:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.calls: dict[str, Call] = {}
        # Refusals are remembered too: the same call asked again gets the same answer.
        self.refused: dict[str, dict[str, Any]] = {}
        # Released calls (and calls released before they were admitted): never counted again.
        self.released: set[str] = set()

    def count(self, key: str) -> int:
        if self.config.counting == "per_call":
            return sum(1 for c in self.calls.values() if key in c.keys())
        return sum(ks.count(key) for c in self.calls.values() for ks in c.legs.values())

    def counters(self) -> dict[str, int]:
        out = {}
        for acc in self.config.accounts:
            for dim in ("calls", "public", "internal"):
                out[f"account:{acc}:{dim}"] = self.count(f"account:{acc}:{dim}")
        for ch in self.config.channels:
            out[f"channel:{ch}:calls"] = self.count(f"channel:{ch}:calls")
        return out

    def has_room(self, key: str) -> bool:
        limit = self.config.limit(key)
        return limit is None or self.count(key) < limit

    def admit(self, call_id: str, origin: str, dialled: str, late: bool = False) -> dict[str, Any]:
        """origin: an extension id or 'channel:<id>'. Returns the decision in the SQL shape
        reduced to what matters: action, why, counter, admitted legs and their targets.
        late: fail-open catch-up of a call already answered, counted whatever the limits."""
        if call_id in self.released:
            return RELEASED
        if call_id in self.calls:
            call = self.calls[call_id]
            if late and call.state == "ringing":
                self.answer(call_id, None)
            return call.decision
        if call_id in self.refused:
            if not late:
                return self.refused[call_id]
            # The refusal never reached the caller and the call went ahead: decide it again.
            del self.refused[call_id]
        return self.decide(call_id, origin, dialled, force=late)

    def decide(self, call_id: str, origin: str, dialled: str, force: bool) -> dict[str, Any]:
        cfg = self.config
        in_chan = origin.split(":", 1)[1] if origin.startswith("channel:") else None
        origin_ext = None if in_chan else origin
        dest = cfg.local(dialled)
        # Only a phone number can leave through a channel; carriers reach only local users.
        if dest is None and (in_chan or not PHONE.match(dialled) or not cfg.candidates(dialled)):
            return {"action": "reject", "why": "not_found"}
        # (from_ext, to_ext, number, inbound channel)
        legs: list[tuple[str | None, str | None, str | None, str | None]] = [
            (origin_ext, dest, None if dest else dialled, in_chan)]
        forwards = dest is not None and (cfg.extensions[dest]["forward"]
                                         or cfg.extensions[dest]["ring_self"])
        if forwards:
            assert dest is not None
            for target in cfg.extensions[dest]["forward"]:
                local = cfg.local(target)
                legs.append((dest, local, None if local else target, None))
            if cfg.extensions[dest]["ring_self"]:
                legs.append((dest, dest, None, None))

        call = Call(state="answered" if force else "ringing")
        self.calls[call_id] = call   # counts as it goes: earlier legs use room
        origin_accs = cfg.chain(origin_ext) if origin_ext else []
        refusal: dict[str, Any] | None = None
        targets: list[dict[str, Any]] = []
        for i, (frm, to, number, chan_in) in enumerate(legs):
            # The channels the leg may leave or come in by.
            if chan_in:
                tries = [chan_in]
            elif number and PHONE.match(number):
                tries = cfg.candidates(number)
            else:
                tries = []
            # A forward target no channel can carry (or no number at all) is not a leg.
            if to is None and not tries:
                continue
            cls = "internal" if frm and to else "public"
            acc_keys: list[str] = []
            for ext in (frm, to):
                if ext:
                    for acc in cfg.chain(ext):
                        for dim in ("calls", cls):
                            key = f"account:{acc}:{dim}"
                            if key not in acc_keys:
                                acc_keys.append(key)
            held = call.keys() if cfg.counting == "per_call" else set()
            full = next((k for k in acc_keys if k not in held and not self.has_room(k)), None)
            chan = None
            if full is None:
                for c in tries:
                    key = f"channel:{c}:calls"
                    if key in held or self.has_room(key):
                        chan = c
                        break
                if tries and chan is None:
                    full = f"channel:{tries[0]}:calls"
            if full is not None:
                if refusal is None:
                    why = ("limit_origin" if i == 0 and full.startswith("account:")
                           and full.split(":")[1] in origin_accs else "limit_destination")
                    refusal = {"action": "reject", "why": why, "counter": full}
                if force:
                    chan = chan or (tries[0] if tries else None)
                elif i == 0:
                    break
                else:
                    continue
            call.legs[i] = acc_keys + ([f"channel:{chan}:calls"] if chan else [])
            if i > 0 or not forwards:
                targets.append({"leg": i, "to": f"extension:{to}" if to else f"number:{number}",
                                "channel": chan})
        if not targets:
            del self.calls[call_id]
            # Refused for the first limit that refused a leg, else: nothing can be reached.
            decision = refusal or {"action": "reject", "why": "not_found"}
            self.refused[call_id] = decision
            return decision
        call.decision = {"action": "relay", "legs": targets}
        return call.decision

    def states(self) -> dict[str, str]:
        """Every call recorded, by its state (as the calls table says)."""
        return ({c: "refused" for c in self.refused} | {c: "released" for c in self.released}
                | {c: call.state for c, call in self.calls.items()})

    def answer(self, call_id: str, leg: int | None) -> None:
        """A 2xx from leg (None: unknown, every slot stays)."""
        call = self.calls.get(call_id)
        if call is None or call.state != "ringing":
            return
        if leg in call.legs:
            call.legs = {n: ks for n, ks in call.legs.items() if n in (0, leg)}
        call.state = "answered"

    def release(self, call_id: str, reason: str = "bye") -> None:
        """The call's end: every slot back, and never counted again. A CANCEL ends only a
        call not answered yet. A refusal stays as it was (it holds nothing)."""
        call = self.calls.get(call_id)
        if call is not None and reason == "cancel" and call.state == "answered":
            return
        if call_id not in self.refused:
            self.calls.pop(call_id, None)
            self.released.add(call_id)
