"""A small asyncio SIP user agent for end-to-end tests (UDP, Python stdlib only).

One :class:`SipUA` owns one UDP socket and is both a UAC and a UAS::

    async with SipUA("127.0.0.3", user="carrier") as uac, SipUA("127.0.0.2") as uas:
        call = await uac.invite(f"sip:2001@{uas.ip}:{uas.port}", proxy=uas.addr)
        assert await call.wait_final(5) == 200
        inc = await uas.wait_invite(1)          # what the other side received
        assert await call.bye() == 200

Messages are kept as they were on the wire: header values are decoded with
``surrogateescape`` so that encoding them again yields the original bytes, and
``SipMessage.raw`` holds the datagram. Tests may pass hostile header lines verbatim
(``extra_headers``, ``from_header``, ``to_header``) or whole datagrams (``send_raw``).

Attacker tests: ``ua.request_raw(method, ruri, dest, call_id, from_tag, to_tag, cseq,
routes=[...], extra_headers=[...], body=b"")`` sends a request with every dialog identifier
chosen by the test and returns the final status (``request_raw_response`` the response,
``build_request_raw`` only the bytes); ``call.cancel(force=True)`` / ``call.send_cancel()``
CANCEL with the INVITE's branch at any moment, after the 200 too; ``call.replay_invite()``
sends the call's INVITE again (same bytes, or ``new_branch=True``). A UAS counts every
INVITE datagram before deduplication: ``uas.raw_invites(call_id)``, ``uas.invite_count``.

Digest: challenges with ``qop="auth"`` (also among others, ``"auth,auth-int"``) are
answered with qop=auth, a cnonce and nc counting per nonce; challenges without qop the
RFC 2069 way. ``ua.preemptive_auth = True`` reuses the last nonce on new requests (nc 2,
3, ...). :class:`DigestChallenger` issues such challenges and checks nc/cnonce.

Timers follow RFC 3261 (T1 = 0.5 s by default, configurable per UA for fast tests).
Everything runs on the event loop thread; no locks are needed, and many UAs and calls
may run concurrently (client transactions are keyed by branch + method, dialogs by
Call-ID + local tag).
"""

# The brief asks for ``await call.wait_final(timeout)``-style APIs, so async functions
# take a ``timeout`` argument on purpose.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

__all__ = [
    "Call",
    "Dialog",
    "DigestChallenger",
    "IncomingCall",
    "SipMessage",
    "SipUA",
    "SipUri",
    "build_message",
    "make_sdp",
    "parse_auth_params",
    "parse_name_addr",
    "parse_uri",
    "parse_via",
    "split_quoted",
]

Addr = tuple[str, int]
HeaderLike = str | bytes | tuple[str, str | bytes]
InvitePolicy = (
    Literal["answer", "ring", "busy", "trying", "ignore"]
    | int
    | Callable[["IncomingCall"], Awaitable[None] | None]
)

# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _md5(text: str) -> str:
    return hashlib.md5(_b(text)).hexdigest()  # noqa: S324 - SIP digest is MD5


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(6)


COMPACT: dict[str, str] = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "r": "refer-to",
    "b": "referred-by",
    "u": "allow-events",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    603: "Decline",
}

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY, MESSAGE"


def canon(name: str) -> str:
    """Canonical (lower-case, long-form) header name."""
    n = name.strip().lower()
    return COMPACT.get(n, n)


def split_quoted(value: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside quoted strings (with backslash escapes) and ``<...>``."""
    parts: list[str] = []
    cur: list[str] = []
    in_q = False
    depth = 0
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_q:
            cur.append(ch)
            if ch == "\\" and i + 1 < n:
                cur.append(value[i + 1])
                i += 2
                continue
            if ch == '"':
                in_q = False
        elif ch == '"':
            in_q = True
            cur.append(ch)
        elif ch == "<":
            depth += 1
            cur.append(ch)
        elif ch == ">":
            depth = max(0, depth - 1)
            cur.append(ch)
        elif ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def parse_params(text: str) -> dict[str, str | None]:
    """``;a=1;lr;tag=x`` -> {"a": "1", "lr": None, "tag": "x"} (keys lower-cased)."""
    out: dict[str, str | None] = {}
    for part in split_quoted(text, ";"):
        k, eq, v = part.partition("=")
        out[k.strip().lower()] = _unquote(v) if eq else None
    return out


@dataclass
class NameAddr:
    display: str
    uri: str
    params: dict[str, str | None]


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``"Display" <uri>;params`` or ``uri;params``. Raises ValueError."""
    v = value.strip()
    in_q = False
    lt = -1
    i = 0
    while i < len(v):
        ch = v[i]
        if in_q:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_q = False
        elif ch == '"':
            in_q = True
        elif ch == "<":
            lt = i
            break
        i += 1
    if lt >= 0:
        gt = v.find(">", lt)
        if gt < 0:
            raise ValueError(f"unterminated <uri> in {value[:80]!r}")
        return NameAddr(v[:lt].strip(), v[lt + 1 : gt].strip(), parse_params(v[gt + 1 :]))
    if in_q:
        raise ValueError(f"unterminated quote in {value[:80]!r}")
    uri, _, rest = v.partition(";")
    return NameAddr("", uri.strip(), parse_params(rest))


def get_tag(value: str | None) -> str | None:
    """The ``tag`` parameter of a From/To value (tolerant of garbage)."""
    if value is None:
        return None
    try:
        return parse_name_addr(value).params.get("tag")
    except ValueError:
        m = re.search(r";\s*tag\s*=\s*([^;>\s,]+)\s*$", value)
        return m.group(1) if m else None


@dataclass
class SipUri:
    scheme: str
    user: str | None
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def dest(self) -> Addr:
        host = self.params.get("maddr") or self.host
        return (host, self.port or 5060)


def parse_uri(uri: str) -> SipUri:
    scheme, colon, rest = uri.strip().partition(":")
    if not colon:
        raise ValueError(f"not a URI: {uri!r}")
    rest = rest.split("?", 1)[0]
    user: str | None = None
    at = rest.find("@")
    if at >= 0:
        user = rest[:at].split(":", 1)[0]
        rest = rest[at + 1 :]
    hostport, _, params = rest.partition(";")
    port: int | None = None
    if hostport.startswith("["):
        end = hostport.find("]")
        host = hostport[1:end]
        tail = hostport[end + 1 :]
        if tail.startswith(":"):
            port = int(tail[1:])
    else:
        host, _, p = hostport.partition(":")
        port = int(p) if p else None
    return SipUri(scheme.lower(), user, host, port, parse_params(params))


@dataclass
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")


_VIA_RE = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*(\S+)\s+([^;\s]+)\s*(.*)$", re.S)


def parse_via(value: str) -> Via:
    m = _VIA_RE.match(value)
    if not m:
        raise ValueError(f"bad Via {value[:80]!r}")
    hostport = m.group(2)
    port: int | None = None
    if hostport.startswith("["):
        end = hostport.find("]")
        host = hostport[1:end]
        if hostport[end + 1 : end + 2] == ":":
            port = int(hostport[end + 2 :])
    else:
        host, _, p = hostport.partition(":")
        port = int(p) if p else None
    return Via(m.group(1).upper(), host, port, parse_params(m.group(3)))


def parse_auth_params(value: str) -> dict[str, str]:
    """``Digest realm="x", nonce="y", qop="auth,auth-int"`` -> dict (keys lower-case)."""
    v = value.strip()
    if v[:6].lower() == "digest":
        v = v[6:]
    out: dict[str, str] = {}
    for part in split_quoted(v, ","):
        k, _, val = part.partition("=")
        out[k.strip().lower()] = _unquote(val)
    return out


def make_sdp(ip: str, port: int = 4000) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------

MULTI_VALUE = {
    "via",
    "route",
    "record-route",
    "contact",
    "allow",
    "supported",
    "require",
    "proxy-require",
    "unsupported",
    "path",
    "service-route",
    "allow-events",
}


class SipMessage:
    """A parsed SIP request or response. Header order and names are preserved."""

    def __init__(
        self,
        first_line: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        raw: bytes = b"",
    ) -> None:
        self.first_line = first_line
        self.headers = headers
        self.body = body
        self.raw = raw
        self.source: Addr | None = None
        self.truncated = False
        self.method: str | None = None
        self.uri: str | None = None
        self.status: int | None = None
        self.reason = ""
        if first_line.startswith("SIP/2.0 "):
            parts = first_line.split(" ", 2)
            self.status = int(parts[1])
            self.reason = parts[2] if len(parts) > 2 else ""
        else:
            parts = first_line.split(" ")
            if len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[0]:
                raise ValueError(f"bad start line {first_line[:80]!r}")
            self.method, self.uri = parts[0].upper(), parts[1]

    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        sep = data.find(b"\r\n\r\n")
        if sep >= 0:
            head, body = data[:sep], data[sep + 4 :]
        else:
            sep = data.find(b"\n\n")
            head, body = (data[:sep], data[sep + 2 :]) if sep >= 0 else (data, b"")
        lines = re.split(r"\r?\n", _s(head))
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            raise ValueError("empty message")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, (value + " " + line.strip()).strip())
            elif ":" in line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
            elif line.strip():
                raise ValueError(f"bad header line {line[:80]!r}")
        msg = cls(lines[0].strip(), headers, body, data)
        cl = msg.get("content-length")
        if cl is not None:
            n = int(cl)
            msg.truncated = len(body) < n
            msg.body = body[:n]
        return msg

    # -- accessors -------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return self.method is not None

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of a header (compact forms accepted), not comma-split."""
        c = canon(name)
        for n, v in self.headers:
            if canon(n) == c:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """All header lines of that name, in order, not comma-split."""
        c = canon(name)
        return [v for n, v in self.headers if canon(n) == c]

    def values(self, name: str) -> list[str]:
        """All values of a header, comma lists split (quote- and <>-aware)."""
        out: list[str] = []
        for v in self.get_all(name):
            out.extend(split_quoted(v))
        return out

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        num, _, method = (self.get("cseq") or "").strip().partition(" ")
        return int(num), method.strip().upper()

    @property
    def vias(self) -> list[str]:
        return self.values("via")

    @property
    def branch(self) -> str | None:
        vias = self.vias
        if not vias:
            return None
        try:
            return parse_via(vias[0]).branch
        except ValueError:
            return None

    @property
    def from_tag(self) -> str | None:
        return get_tag(self.get("from"))

    @property
    def to_tag(self) -> str | None:
        return get_tag(self.get("to"))

    @property
    def contact_uri(self) -> str | None:
        contacts = self.values("contact")
        if not contacts:
            return None
        try:
            return parse_name_addr(contacts[0]).uri
        except ValueError:
            return None

    def __repr__(self) -> str:
        return f"<SipMessage {self.first_line!r} call-id={self.call_id!r}>"


def _line(h: HeaderLike) -> bytes:
    if isinstance(h, tuple):
        return _b(h[0]) + b": " + _b(h[1])
    return _b(h)


def _line_name(line: bytes) -> str:
    return canon(line.split(b":", 1)[0].decode("latin-1"))


def build_message(first_line: str, headers: Iterable[HeaderLike], body: bytes = b"") -> bytes:
    """Serialise a message. Header lines are emitted verbatim; ``Content-Length`` is
    added unless one of the given lines already is a Content-Length (or ``l:``)."""
    lines = [_line(h) for h in headers]
    if not any(_line_name(x) == "content-length" for x in lines):
        lines.append(b"Content-Length: %d" % len(body))
    return _b(first_line) + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n" + body


# ---------------------------------------------------------------------------
# Digest authentication
# ---------------------------------------------------------------------------


def digest_response(
    user: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str = "",
    cnonce: str = "",
) -> str:
    ha1 = _md5(f"{user}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


class DigestChallenger:
    """Test-only digest challenger. Use as ``uas.on_invite = DigestChallenger(...)``
    (407 + Proxy-Authenticate, then verifies Proxy-Authorization and answers) or as
    ``uas.registrar = DigestChallenger(..., proxy=False)`` for REGISTER (401).

    ``qop``: True offers ``qop="auth"``; a string is offered as given (``"auth,auth-int"``);
    False/None/"" sends a challenge without qop (RFC 2069 style). With qop, a response
    must say ``qop=auth``, carry a ``cnonce`` and an ``nc`` greater than the last one
    accepted for that nonce (nonce counting: a nonce may be reused with nc 2, 3, ...).
    ``stale_after``: a nonce used that many times is refused with a new challenge
    carrying ``stale=true``."""

    def __init__(
        self,
        users: dict[str, str],
        realm: str = "sipua.test",
        *,
        proxy: bool = True,
        qop: bool | str | None = True,
        then: Literal["answer", "ring"] = "answer",
        opaque: str | None = None,
        stale_after: int | None = None,
    ) -> None:
        self.users = users
        self.realm = realm
        self.proxy = proxy
        self.qop = ("auth" if qop is True else qop) or ""
        self.then = then
        self.opaque = opaque
        self.stale_after = stale_after
        self.nonces: dict[str, int] = {}  # nonce -> highest nc accepted (0: none yet)
        self.uses: dict[str, int] = {}  # nonce -> requests accepted with it
        self.challenges = 0
        self.stale = False  # the next challenge says stale=true
        self.accepted: list[str] = []
        self.failures: list[str] = []
        self.credentials: list[dict[str, str]] = []  # every credential set verified

    @property
    def status(self) -> int:
        return 407 if self.proxy else 401

    @property
    def offered_qops(self) -> list[str]:
        return [q.strip() for q in self.qop.split(",") if q.strip()]

    def challenge_header(self) -> tuple[str, str]:
        nonce = secrets.token_hex(16)
        self.nonces[nonce] = 0
        self.uses[nonce] = 0
        self.challenges += 1
        name = "Proxy-Authenticate" if self.proxy else "WWW-Authenticate"
        value = f'Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5'
        if self.qop:
            value += f', qop="{self.qop}"'
        if self.opaque is not None:
            value += f', opaque="{self.opaque}"'
        if self.stale:
            value += ", stale=true"
            self.stale = False
        return name, value

    def _fail(self, why: str) -> None:
        self.failures.append(why)

    def verify(self, req: SipMessage) -> str | None:
        """Username if the request carries valid credentials, else None (the reason
        goes to ``failures``)."""
        name = "proxy-authorization" if self.proxy else "authorization"
        creds = req.get_all(name)
        if not creds:
            return None
        for value in creds:
            p = parse_auth_params(value)
            self.credentials.append(p)
            if p.get("realm") != self.realm:
                self._fail("realm")
                continue
            nonce = p.get("nonce", "")
            if nonce not in self.nonces:
                self._fail("stale nonce")
                continue
            user = p.get("username", "")
            if user not in self.users:
                self._fail("unknown user")
                continue
            if self.opaque is not None and p.get("opaque") != self.opaque:
                self._fail("opaque")
                continue
            qop = p.get("qop") or None
            nc = p.get("nc", "")
            cnonce = p.get("cnonce", "")
            if self.qop:
                if qop is None:
                    self._fail("qop missing")
                    continue
                if qop not in self.offered_qops or qop != "auth":
                    self._fail("bad qop")
                    continue
                if not cnonce:
                    self._fail("cnonce missing")
                    continue
                if not re.fullmatch(r"[0-9a-fA-F]{8}", nc):
                    self._fail("bad nc")
                    continue
                if int(nc, 16) <= self.nonces[nonce]:
                    self._fail("nc replay")
                    continue
            elif qop is not None:
                self._fail("qop not offered")
                continue
            if self.stale_after is not None and self.uses[nonce] >= self.stale_after:
                self._fail("nonce used up")
                self.stale = True
                continue
            expected = digest_response(
                user,
                self.realm,
                self.users[user],
                req.method or "",
                p.get("uri", ""),
                nonce,
                qop,
                nc,
                cnonce,
            )
            if expected != p.get("response"):
                self._fail("bad response")
                continue
            if qop:
                self.nonces[nonce] = int(nc, 16)
            self.uses[nonce] += 1
            self.accepted.append(user)
            return user
        return None

    def __call__(self, call: IncomingCall) -> None:
        if self.verify(call.invite) is None:
            call.reject(self.status, extra_headers=[self.challenge_header()])
            return
        call.ringing()
        if self.then == "answer":
            call.answer()


# ---------------------------------------------------------------------------
# Transactions
# ---------------------------------------------------------------------------


@dataclass
class _ClientTx:
    responded: bool = False
    provisional: bool = False
    done: bool = False
    retransmissions: int = 0


@dataclass
class ServerTx:
    dest: Addr
    last: bytes | None = None
    call: IncomingCall | None = None
    retransmissions: int = 0


class _Waiters:
    """Futures waiting for a response that matches a predicate."""

    def __init__(self) -> None:
        self._w: list[tuple[Callable[[SipMessage], bool], asyncio.Future[SipMessage]]] = []

    def feed(self, msg: SipMessage) -> None:
        keep = []
        for pred, fut in self._w:
            if fut.done():
                continue
            if pred(msg):
                fut.set_result(msg)
            else:
                keep.append((pred, fut))
        self._w = keep

    async def wait(
        self,
        history: Sequence[SipMessage],
        pred: Callable[[SipMessage], bool],
        timeout: float,
    ) -> SipMessage:
        for m in history:
            if pred(m):
                return m
        fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._w.append((pred, fut))
        return await asyncio.wait_for(fut, timeout)


# ---------------------------------------------------------------------------
# Dialogs
# ---------------------------------------------------------------------------


class Dialog:
    """State shared by the caller side (:class:`Call`) and callee side
    (:class:`IncomingCall`): route set, remote target, tags, in-dialog requests."""

    def __init__(
        self,
        ua: SipUA,
        call_id: str,
        local_tag: str | None,
        local_header: str | bytes,
        remote_header: str | bytes | None,
        local_cseq: int,
    ) -> None:
        self.ua = ua
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag: str | None = None
        self.local_header = local_header  # From of our in-dialog requests
        self.remote_header = remote_header  # To of our in-dialog requests
        self.route_set: list[str] = []
        self.remote_target: str | None = None
        self.local_cseq = local_cseq
        self.requests: list[SipMessage] = []  # in-dialog requests received
        self.acks_received: list[SipMessage] = []
        self.confirmed = asyncio.Event()
        self.ended = asyncio.Event()
        self.bye_received = asyncio.Event()
        self.acks_sent = 0
        self._acked: dict[int, asyncio.Event] = {}
        self._ack_cache: dict[tuple[int, str | None], tuple[bytes, Addr]] = {}

    # -- building in-dialog requests ------------------------------------
    def _target(self) -> tuple[str, list[str], Addr]:
        if self.remote_target is None:
            raise RuntimeError("dialog not established (no remote target)")
        if self.route_set:
            first = parse_name_addr(self.route_set[0]).uri
            fu = parse_uri(first)
            if "lr" in fu.params:
                return self.remote_target, list(self.route_set), fu.dest
            # strict router: R-URI = first route, remote target appended as last route
            routes = self.route_set[1:] + [f"<{self.remote_target}>"]
            return first, routes, fu.dest
        return self.remote_target, [], parse_uri(self.remote_target).dest

    def build_request(
        self,
        method: str,
        cseq: int | None = None,
        branch: str | None = None,
        body: bytes = b"",
        extra_headers: Sequence[HeaderLike] = (),
        to_header: str | bytes | None = None,
        content_type: str = "application/sdp",
    ) -> tuple[bytes, Addr]:
        ruri, routes, dest = self._target()
        headers: list[HeaderLike] = [
            ("Via", self.ua.via(branch or new_branch())),
            ("Max-Forwards", "70"),
        ]
        headers += [("Route", r) for r in routes]
        headers += [
            ("From", self.local_header),
            ("To", to_header if to_header is not None else self.remote_header or ""),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq if cseq is not None else self.local_cseq} {method}"),
        ]
        if method in ("INVITE", "UPDATE", "ACK"):
            headers.append(("Contact", f"<{self.ua.contact_uri}>"))
        headers.append(("User-Agent", self.ua.user_agent))
        headers += list(extra_headers)
        if body:
            headers.append(("Content-Type", content_type))
        return build_message(f"{method} {ruri} SIP/2.0", headers, body), dest

    def _send_ack_2xx(self, resp: SipMessage) -> None:
        key = (resp.cseq[0], resp.to_tag)
        cached = self._ack_cache.get(key)
        if cached is None:
            cached = self.build_request("ACK", cseq=resp.cseq[0], to_header=resp.get("to"))
            self._ack_cache[key] = cached
        self.ua.send_raw(*cached)
        self.acks_sent += 1

    async def request(
        self,
        method: str,
        body: bytes = b"",
        extra_headers: Sequence[HeaderLike] = (),
        timeout: float = 5.0,
    ) -> SipMessage:
        """Send an in-dialog request along the route set; return the final response.
        For INVITE the 2xx is ACKed end-to-end and a non-2xx hop-by-hop."""
        self.local_cseq += 1
        cseq = self.local_cseq
        branch = new_branch()
        data, dest = self.build_request(method, cseq, branch, body, extra_headers)

        def on_final(resp: SipMessage) -> None:
            if method != "INVITE":
                return
            if resp.status is not None and resp.status < 300:
                if resp.contact_uri:
                    self.remote_target = resp.contact_uri
                self._send_ack_2xx(resp)
            else:
                ack, _ = self.build_request("ACK", cseq, branch, to_header=resp.get("to"))
                self.ua.send_raw(ack, dest)
                self.acks_sent += 1

        return await self.ua.transact(data, dest, branch, method, timeout, on_final)

    async def bye(self, timeout: float = 5.0) -> int:
        """Send BYE in the dialog, wait for its final response, return the status."""
        resp = await self.request("BYE", timeout=timeout)
        self.ended.set()
        assert resp.status is not None
        return resp.status

    async def reinvite(self, body: bytes | None = None, timeout: float = 5.0) -> int:
        """In-dialog INVITE (new CSeq); 2xx is ACKed. Returns the final status."""
        sdp = make_sdp(self.ua.ip) if body is None else body
        resp = await self.request("INVITE", sdp, timeout=timeout)
        assert resp.status is not None
        return resp.status

    async def wait_ended(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.ended.wait(), timeout)

    # -- receiving in-dialog requests -----------------------------------
    def _on_ack(self, ack: SipMessage) -> None:
        self.acks_received.append(ack)
        try:
            ev = self._acked.get(ack.cseq[0])
        except ValueError:
            return
        if ev is not None:
            ev.set()

    def _on_request(self, req: SipMessage, st: ServerTx) -> None:
        self.requests.append(req)
        ua = self.ua
        m = req.method
        if m == "BYE":
            ua.respond(req, st, 200)
            self.bye_received.set()
            self.ended.set()
        elif m == "INVITE":
            if req.contact_uri:
                self.remote_target = req.contact_uri
            data = ua.respond(req, st, 200, contact=True, body=make_sdp(ua.ip))
            ua.retransmit_until_ack(self, req.cseq[0], data, st.dest)
        elif m in ("OPTIONS", "INFO", "UPDATE", "NOTIFY", "MESSAGE", "PRACK"):
            ua.respond(req, st, 200, contact=m == "UPDATE")
        else:
            ua.respond(req, st, 501)


class Call(Dialog):
    """Caller side of a call, created by :meth:`SipUA.invite`."""

    def __init__(
        self,
        ua: SipUA,
        target_uri: str,
        dest: Addr,
        from_header: str | bytes,
        to_header: str | bytes,
        extra_headers: Sequence[HeaderLike],
        auth: bool,
        body: bytes,
        call_id: str,
    ) -> None:
        local_tag = get_tag(_s(_b(from_header)))
        super().__init__(ua, call_id, local_tag, from_header, None, 1)
        self.request_uri = target_uri
        self.dest = dest
        self.from_header = from_header
        self.to_header = to_header
        self.extra_headers = list(extra_headers)
        self.auth = auth
        self.body = body
        self.invite_bytes = b""  # the INVITE currently in progress, as sent
        self.invites_sent: list[bytes] = []  # one per attempt (auth retries)
        self.branch = ""
        self.invite_cseq = 1
        self.responses: list[SipMessage] = []
        self.provisionals: list[SipMessage] = []
        self.late_provisionals: list[SipMessage] = []  # 1xx after the final
        self.challenges: list[SipMessage] = []  # 401/407 that were answered
        self.final: SipMessage | None = None
        self.retransmissions = 0  # manual, via retransmit()
        self.cancels_sent = 0
        self.replays: list[bytes] = []  # INVITEs sent again by replay_invite()
        self.tx = _ClientTx()
        self._final_fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._waiters = _Waiters()
        self._auth_tries = 0

    @property
    def status(self) -> int | None:
        """Last status code seen (final if any)."""
        if self.final is not None:
            return self.final.status
        return self.responses[-1].status if self.responses else None

    # -- sending --------------------------------------------------------
    def _send_invite(self, auth_header: tuple[str, str] | None = None) -> None:
        ua = self.ua
        branch = new_branch()
        cseq = self.local_cseq
        headers: list[HeaderLike] = [
            ("Via", ua.via(branch)),
            ("Max-Forwards", "70"),
            ("From", self.from_header),
            ("To", self.to_header),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} INVITE"),
            ("Contact", f"<{ua.contact_uri}>"),
            ("User-Agent", ua.user_agent),
        ]
        if auth_header:
            headers.append(auth_header)
        headers += self.extra_headers
        if self.body:
            headers.append(("Content-Type", "application/sdp"))
        data = build_message(f"INVITE {self.request_uri} SIP/2.0", headers, self.body)
        self.branch, self.invite_cseq, self.invite_bytes = branch, cseq, data
        self.invites_sent.append(data)
        tx = _ClientTx()
        self.tx = tx
        attempt: dict[str, SipMessage | None] = {"final": None}

        def handler(resp: SipMessage) -> None:
            self._on_response(resp, branch, cseq, tx, attempt)

        ua._client_tx[(branch, "INVITE")] = handler
        ua.send_raw(data, self.dest)
        ua.spawn(ua._retransmit(data, self.dest, tx, invite=True))

    def retransmit(self) -> None:
        """Re-send the current INVITE byte-for-byte (same branch), as a retransmission."""
        self.retransmissions += 1
        self.ua.send_raw(self.invite_bytes, self.dest)

    def build_cancel(self) -> bytes:
        """A CANCEL of the current INVITE: same branch, Request-URI, From, To (without
        the remote tag), Call-ID and CSeq number."""
        headers: list[HeaderLike] = [
            ("Via", self.ua.via(self.branch)),
            ("Max-Forwards", "70"),
            ("From", self.from_header),
            ("To", self.to_header),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.invite_cseq} CANCEL"),
            ("User-Agent", self.ua.user_agent),
        ]
        return build_message(f"CANCEL {self.request_uri} SIP/2.0", headers)

    async def cancel(self, timeout: float = 5.0, *, force: bool = False) -> int | None:
        """CANCEL the pending INVITE; returns the CANCEL's final status, or None if the
        INVITE already had a final response (nothing sent). Waits for a provisional
        first, as RFC 3261 requires. The INVITE's own final (487) via wait_final().

        ``force=True`` sends the CANCEL at once, whatever the state: before any
        response (while the proxy is still deciding), or after the 200 (a CANCEL that
        must change nothing). It reuses the INVITE's branch; raises TimeoutError if the
        CANCEL gets no final response."""
        if not force:
            if self.final is None and not self.provisionals:
                with contextlib.suppress(TimeoutError):
                    await self.wait_response(lambda r: True, timeout)
            if self.final is not None:
                return None
        self.cancels_sent += 1
        resp = await self.ua.transact(
            self.build_cancel(), self.dest, self.branch, "CANCEL", timeout
        )
        return resp.status

    def send_cancel(self) -> bytes:
        """Send one CANCEL datagram for the current INVITE now, without waiting for
        anything (e.g. the very moment after the INVITE; several in a row)."""
        data = self.build_cancel()
        self.cancels_sent += 1
        self.ua.send_raw(data, self.dest)
        return data

    async def replay_invite(self, *, new_branch: bool = False, timeout: float = 5.0) -> SipMessage:
        """Send the current INVITE again as its own client transaction and return the
        final response (ACKed: a non-2xx with the INVITE's branch, a 2xx end to end).

        ``new_branch=False``: byte for byte the same datagram (same Call-ID, From tag,
        CSeq and branch), e.g. once the proxy's transaction is gone. ``new_branch=True``:
        only the top Via's branch differs, so the proxy sees a new transaction at once.
        Responses to it do not change this Call's state (``final``, dialog)."""
        data = self.invite_bytes
        branch = self.branch
        if new_branch:
            branch = "z9hG4bK" + secrets.token_hex(8)
            data = data.replace(_b(f"branch={self.branch}"), _b(f"branch={branch}"), 1)
        self.replays.append(data)
        cseq = self.invite_cseq

        def on_final(resp: SipMessage) -> None:
            code = resp.status or 0
            if code < 300:
                ack, dest = self._replay_ack_2xx(resp)
                self.ua.send_raw(ack, dest)
            else:
                self._ack_non2xx(resp, branch, cseq)

        return await self.ua.transact(data, self.dest, branch, "INVITE", timeout, on_final)

    def _replay_ack_2xx(self, resp: SipMessage) -> tuple[bytes, Addr]:
        routes = list(reversed(resp.values("record-route")))
        target = resp.contact_uri or self.request_uri
        dest = self.dest
        ruri = target
        if routes:
            first = parse_uri(parse_name_addr(routes[0]).uri)
            dest = first.dest
        headers: list[HeaderLike] = [("Via", self.ua.via(new_branch())), ("Max-Forwards", "70")]
        headers += [("Route", r) for r in routes]
        headers += [
            ("From", self.from_header),
            ("To", resp.get("to") or ""),
            ("Call-ID", self.call_id),
            ("CSeq", f"{resp.cseq[0]} ACK"),
            ("User-Agent", self.ua.user_agent),
        ]
        return build_message(f"ACK {ruri} SIP/2.0", headers), dest

    # -- receiving ------------------------------------------------------
    def _on_response(
        self,
        resp: SipMessage,
        branch: str,
        cseq: int,
        tx: _ClientTx,
        attempt: dict[str, SipMessage | None],
    ) -> None:
        tx.responded = True
        self.responses.append(resp)
        code = resp.status or 0
        try:
            if code < 200:
                if self.final is not None or attempt["final"] is not None:
                    self.late_provisionals.append(resp)
                else:
                    tx.provisional = True
                    self.provisionals.append(resp)
                return
            tx.done = True
            if code < 300:
                self._on_2xx(resp)
                if attempt["final"] is None:
                    attempt["final"] = resp
                    self._set_final(resp)
                return
            self._ack_non2xx(resp, branch, cseq)
            if attempt["final"] is not None:
                return  # retransmitted final, re-ACKed
            attempt["final"] = resp
            if code in (401, 407) and self._maybe_authenticate(resp):
                return
            self._set_final(resp)
        finally:
            self._waiters.feed(resp)

    def _maybe_authenticate(self, resp: SipMessage) -> bool:
        ua = self.ua
        if not self.auth or ua.password is None:
            return False
        stale = False
        chal = resp.get("proxy-authenticate" if resp.status == 407 else "www-authenticate")
        if chal:
            stale = (parse_auth_params(chal).get("stale") or "").lower() == "true"
        if self._auth_tries >= 1 and not (stale and self._auth_tries < 3):
            return False
        hdr = ua.authorization(resp, "INVITE", self.request_uri)
        if hdr is None:
            return False
        self._auth_tries += 1
        self.challenges.append(resp)
        self.local_cseq += 1
        self._send_invite(hdr)
        return True

    def _ack_non2xx(self, resp: SipMessage, branch: str, cseq: int) -> None:
        headers: list[HeaderLike] = [
            ("Via", self.ua.via(branch)),
            ("Max-Forwards", "70"),
            ("From", self.from_header),
            ("To", resp.get("to") or _s(_b(self.to_header))),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} ACK"),
            ("User-Agent", self.ua.user_agent),
        ]
        self.ua.send_raw(build_message(f"ACK {self.request_uri} SIP/2.0", headers), self.dest)
        self.acks_sent += 1

    def _on_2xx(self, resp: SipMessage) -> None:
        if self.remote_target is None:
            self.remote_tag = resp.to_tag
            self.remote_header = resp.get("to")
            self.route_set = list(reversed(resp.values("record-route")))
            self.remote_target = resp.contact_uri or self.request_uri
        self._send_ack_2xx(resp)
        self.confirmed.set()

    def _on_stray_2xx(self, resp: SipMessage) -> None:
        self.responses.append(resp)
        self._on_2xx(resp)
        self._waiters.feed(resp)

    def _set_final(self, resp: SipMessage) -> None:
        if self.final is None:
            self.final = resp
        if not self._final_fut.done():
            self._final_fut.set_result(resp)
        if resp.status is not None and resp.status >= 300:
            self.ended.set()

    # -- waiting --------------------------------------------------------
    async def wait_final_response(self, timeout: float = 5.0) -> SipMessage:
        """The final response of the (last) INVITE attempt. Raises TimeoutError."""
        return await asyncio.wait_for(asyncio.shield(self._final_fut), timeout)

    async def wait_final(self, timeout: float = 5.0) -> int:
        """Final status code; the response itself is then ``call.final``."""
        resp = await self.wait_final_response(timeout)
        assert resp.status is not None
        return resp.status

    async def wait_response(
        self, match: int | Callable[[SipMessage], bool], timeout: float = 5.0
    ) -> SipMessage:
        """First response (already received or future) with that status / predicate."""
        pred: Callable[[SipMessage], bool]
        if isinstance(match, int):
            code = match
            pred = lambda r: r.status == code  # noqa: E731
        else:
            pred = match
        return await self._waiters.wait(self.responses, pred, timeout)

    async def wait_provisional(self, code: int | None = None, timeout: float = 5.0) -> SipMessage:
        return await self.wait_response(
            lambda r: r.status is not None
            and r.status < 200
            and (code is None or r.status == code),
            timeout,
        )


class IncomingCall(Dialog):
    """Callee side of a call: the INVITE received and manual controls."""

    def __init__(self, ua: SipUA, invite: SipMessage, st: ServerTx) -> None:
        local_tag = new_tag()
        to_value = invite.get("to") or ""
        super().__init__(
            ua, invite.call_id, local_tag, f"{to_value};tag={local_tag}", invite.get("from"), 1
        )
        self.invite = invite
        self.st = st
        self.remote_tag = invite.from_tag
        self.route_set = invite.values("record-route")  # not reversed for the callee
        self.remote_target = invite.contact_uri
        if self.remote_target is None:
            with contextlib.suppress(ValueError):
                self.remote_target = parse_name_addr(invite.get("from") or "").uri
        self.invite_cseq = invite.cseq[0]
        self.sent: list[int] = []
        self.final_status: int | None = None
        self.cancelled = asyncio.Event()
        self.acked = asyncio.Event()
        self._acked[self.invite_cseq] = self.acked

    @property
    def request_uri(self) -> str:
        return self.invite.uri or ""

    @property
    def source(self) -> Addr | None:
        return self.invite.source

    def respond(
        self,
        code: int,
        reason: str | None = None,
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        *,
        force: bool = False,
    ) -> bool:
        """Send a response to the INVITE. Refuses (returns False) after a final unless
        ``force`` (used by tests to send a 1xx after the 2xx or a duplicate 2xx)."""
        if self.final_status is not None and not force:
            return False
        ua = self.ua
        tag = self.local_tag if code > 100 else None
        data = ua.respond(
            self.invite,
            self.st,
            code,
            reason,
            to_tag=tag,
            extra_headers=extra_headers,
            body=body,
            contact=100 < code < 300,
            record_route=100 < code < 300,
        )
        self.sent.append(code)
        if code >= 200 and self.final_status is None:
            self.final_status = code
            if code >= 300:
                self.ended.set()
            ua.retransmit_until_ack(self, self.invite_cseq, data, self.st.dest)
        return True

    def trying(self) -> bool:
        return self.respond(100)

    def ringing(self, code: int = 180, body: bytes = b"") -> bool:
        return self.respond(code, body=body)

    def answer(self, body: bytes | None = None, extra_headers: Sequence[HeaderLike] = ()) -> bool:
        sdp = make_sdp(self.ua.ip) if body is None else body
        return self.respond(200, extra_headers=extra_headers, body=sdp)

    def reject(
        self, code: int = 486, reason: str | None = None, extra_headers: Sequence[HeaderLike] = ()
    ) -> bool:
        return self.respond(code, reason, extra_headers)

    async def wait_acked(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.acked.wait(), timeout)

    def _on_ack(self, ack: SipMessage) -> None:
        super()._on_ack(ack)
        if self.acked.is_set() and self.final_status is not None and self.final_status < 300:
            self.confirmed.set()

    def _on_cancel(self, cancel: SipMessage, st: ServerTx) -> None:
        self.ua.respond(cancel, st, 200, to_tag=self.local_tag)
        if self.final_status is None:
            self.cancelled.set()
            self.reject(487)


# ---------------------------------------------------------------------------
# The user agent
# ---------------------------------------------------------------------------


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, ua: SipUA) -> None:
        self.ua = ua

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.ua._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.ua.errors.append(exc)


class SipUA:
    """A UDP SIP user agent (UAC + UAS) on its own socket."""

    def __init__(
        self,
        local_ip: str = "127.0.0.1",
        port: int = 0,
        user: str = "1001",
        password: str | None = None,
        domain: str = "127.0.0.1",
        *,
        auth_user: str | None = None,
        display_name: str | None = None,
        user_agent: str = "sipua-test/1.0",
        t1: float = 0.5,
        t2: float = 4.0,
    ) -> None:
        self.ip = local_ip
        self.port = port
        self.user = user
        self.password = password
        self.domain = domain
        self.auth_user = auth_user or user
        self.display_name = display_name
        self.user_agent = user_agent
        self.t1 = t1
        self.t2 = t2
        # UAS behaviour
        self.on_invite: InvitePolicy = "answer"
        self.answer_delay = 0.0  # seconds between 180 and 200 in "answer" mode
        self.registrar: DigestChallenger | None = None  # challenge incoming REGISTER
        # records
        self.received: list[SipMessage] = []  # initial INVITEs (new calls only)
        self.incoming: list[IncomingCall] = []
        self.requests: list[SipMessage] = []  # every request datagram, retransmissions too
        self.responses: list[SipMessage] = []  # every response datagram
        self.calls: list[Call] = []
        self.stray: list[SipMessage] = []  # responses matching no transaction
        self.errors: list[Any] = []  # parse errors, handler exceptions, ICMP errors
        self.registrations: dict[str, str] = {}  # AOR -> Contact (when acting as registrar)
        self.transport: asyncio.DatagramTransport | None = None
        self._invite_q: asyncio.Queue[IncomingCall] = asyncio.Queue()
        self._client_tx: dict[tuple[str, str], Callable[[SipMessage], None]] = {}
        self._server_tx: dict[tuple[str, str], ServerTx] = {}
        self._dialogs: dict[tuple[str, str | None], Dialog] = {}
        self._calls_by_id: dict[str, Call] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._nc: dict[str, int] = {}
        # digest: reuse the last challenge's nonce on new INVITEs/REGISTERs (nc 2, 3, ...)
        self.preemptive_auth = False
        self.last_challenge: SipMessage | None = None
        # every INVITE datagram received, retransmissions included, by Call-ID
        self.invites_by_call_id: dict[str, list[SipMessage]] = {}
        self._reg_call_id = f"{secrets.token_hex(10)}@{local_ip}"
        self._reg_tag = new_tag()
        self._reg_cseq = 0

    # -- lifecycle ------------------------------------------------------
    async def start(self) -> SipUA:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.ip, self.port)
        )
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def forget(self, dialog: Dialog) -> None:
        """Lose a dialog as a phone that restarted does: its in-dialog requests (a BYE, a
        keepalive OPTIONS) get 481 from now on."""
        self._dialogs.pop((dialog.call_id, dialog.local_tag), None)

    async def close(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self._client_tx.clear()

    async def __aenter__(self) -> SipUA:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- identity -------------------------------------------------------
    @property
    def addr(self) -> Addr:
        return (self.ip, self.port)

    @property
    def contact_uri(self) -> str:
        return f"sip:{self.user}@{self.ip}:{self.port}"

    @property
    def uri(self) -> str:
        """This UA reached directly: ``sip:user@ip:port``."""
        return self.contact_uri

    def via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self.ip}:{self.port};branch={branch};rport"

    # -- plumbing -------------------------------------------------------
    def send_raw(self, data: bytes, dest: Addr) -> None:
        """Send a datagram verbatim from this UA's socket."""
        if self.transport is None:
            raise RuntimeError("SipUA not started")
        self.transport.sendto(data, dest)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.errors.append(t.exception())

        task.add_done_callback(done)
        return task

    def _later(self, delay: float, fn: Callable[[], Any]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, fn))

    async def _retransmit(self, data: bytes, dest: Addr, tx: _ClientTx, invite: bool) -> None:
        """Timer A (INVITE: until any response) / timer E (non-INVITE: until final)."""
        interval = self.t1
        elapsed = 0.0
        while True:
            await asyncio.sleep(interval)
            elapsed += interval
            if tx.done or (invite and tx.responded) or elapsed >= 64 * self.t1:
                return
            self.send_raw(data, dest)
            tx.retransmissions += 1
            if invite:
                interval *= 2
            else:
                interval = self.t2 if tx.provisional else min(interval * 2, self.t2)

    def retransmit_until_ack(self, dlg: Dialog, cseq: int, data: bytes, dest: Addr) -> None:
        """UAS: resend a final INVITE response (T1 doubling, capped at T2) until ACK."""
        ev = dlg._acked.setdefault(cseq, asyncio.Event())

        async def run() -> None:
            interval = self.t1
            elapsed = 0.0
            while elapsed < 64 * self.t1:
                try:
                    await asyncio.wait_for(ev.wait(), interval)
                    return
                except TimeoutError:
                    pass
                elapsed += interval
                self.send_raw(data, dest)
                interval = min(interval * 2, self.t2)

        self.spawn(run())

    async def transact(
        self,
        data: bytes,
        dest: Addr,
        branch: str,
        method: str,
        timeout: float = 5.0,
        on_final: Callable[[SipMessage], None] | None = None,
    ) -> SipMessage:
        """Run a client transaction for an already-built request; return the final
        response. ``on_final`` also sees retransmitted finals (to re-ACK them)."""
        fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        tx = _ClientTx()
        key = (branch, method)

        def handler(resp: SipMessage) -> None:
            tx.responded = True
            if (resp.status or 0) < 200:
                tx.provisional = True
                return
            tx.done = True
            if on_final is not None:
                on_final(resp)
            if not fut.done():
                fut.set_result(resp)

        self._client_tx[key] = handler
        self.send_raw(data, dest)
        task = self.spawn(self._retransmit(data, dest, tx, invite=method == "INVITE"))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            tx.done = True
            task.cancel()

            def drop() -> None:
                if self._client_tx.get(key) is handler:
                    del self._client_tx[key]

            self._later(64 * self.t1, drop)

    def _response_dest(self, req: SipMessage, source: Addr) -> Addr:
        vias = req.vias
        if not vias:
            return source
        try:
            via = parse_via(vias[0])
        except ValueError:
            return source
        if "rport" in via.params:
            return source
        return (via.params.get("received") or via.host, via.port or 5060)

    def build_response(
        self,
        req: SipMessage,
        code: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        contact: bool = False,
        record_route: bool = False,
        content_type: str = "application/sdp",
    ) -> bytes:
        headers: list[HeaderLike] = [("Via", v) for v in req.get_all("via")]
        from_ = req.get("from")
        to = req.get("to")
        if from_ is not None:
            headers.append(("From", from_))
        if to is not None:
            if to_tag and get_tag(to) is None:
                to = f"{to};tag={to_tag}"
            headers.append(("To", to))
        headers.append(("Call-ID", req.call_id))
        cseq = req.get("cseq")
        if cseq is not None:
            headers.append(("CSeq", cseq))
        if record_route:
            headers += [("Record-Route", v) for v in req.get_all("record-route")]
        if contact:
            headers.append(("Contact", f"<{self.contact_uri}>"))
        headers.append(("Server", self.user_agent))
        headers += list(extra_headers)
        if body:
            headers.append(("Content-Type", content_type))
        phrase = reason if reason is not None else REASONS.get(code, "Unknown")
        return build_message(f"SIP/2.0 {code} {phrase}", headers, body)

    def respond(
        self,
        req: SipMessage,
        st: ServerTx,
        code: int,
        reason: str | None = None,
        **kw: Any,
    ) -> bytes:
        data = self.build_response(req, code, reason, **kw)
        st.last = data
        self.send_raw(data, st.dest)
        return data

    # -- receiving ------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if not data.strip():
            return  # CRLF keep-alive
        try:
            msg = SipMessage.parse(data)
        except (ValueError, IndexError) as e:
            self.errors.append(("parse", e, data[:200]))
            return
        msg.source = addr
        try:
            if msg.is_request:
                self._on_request(msg, addr)
            else:
                self._on_response(msg)
        except Exception as e:  # keep the socket alive whatever a test sends
            self.errors.append(e)

    def _on_response(self, msg: SipMessage) -> None:
        self.responses.append(msg)
        try:
            key = (msg.branch or "", msg.cseq[1])
        except ValueError:
            self.stray.append(msg)
            return
        handler = self._client_tx.get(key)
        if handler is not None:
            handler(msg)
            return
        call = self._calls_by_id.get(msg.call_id)
        if call is not None and key[1] == "INVITE" and 200 <= (msg.status or 0) < 300:
            call._on_stray_2xx(msg)
            return
        self.stray.append(msg)

    def _find_dialog(self, call_id: str, tag: str | None) -> Dialog | None:
        return self._dialogs.get((call_id, tag))

    def _on_request(self, req: SipMessage, source: Addr) -> None:
        self.requests.append(req)
        method = req.method or ""
        branch = req.branch
        if method == "INVITE":
            self.invites_by_call_id.setdefault(req.call_id, []).append(req)
        if method == "ACK":
            dlg = self._find_dialog(req.call_id, req.to_tag)
            if dlg is None and branch:
                st0 = self._server_tx.get((branch, "INVITE"))
                dlg = st0.call if st0 else None
            if dlg is not None:
                dlg._on_ack(req)
            return
        key = (branch or "", method)
        if branch:
            old = self._server_tx.get(key)
            if old is not None:  # retransmission
                old.retransmissions += 1
                if old.last is not None:
                    self.send_raw(old.last, old.dest)
                return
        st = ServerTx(dest=self._response_dest(req, source))
        if branch:
            self._server_tx[key] = st
        if method == "CANCEL":
            inv = self._server_tx.get((branch or "", "INVITE"))
            if inv is not None and inv.call is not None:
                inv.call._on_cancel(req, st)
            else:
                self.respond(req, st, 481)
            return
        to_tag = req.to_tag
        dlg = self._find_dialog(req.call_id, to_tag)
        if to_tag is not None or (dlg is not None and method != "INVITE"):
            if dlg is None or (
                to_tag is not None
                and dlg.remote_tag is not None
                and req.from_tag != dlg.remote_tag
            ):  # a dialog is Call-ID + both tags (RFC 3261 12): a forged From tag is unknown
                self.respond(req, st, 481)
            else:
                dlg._on_request(req, st)
            return
        if method == "INVITE":
            self._new_incoming(req, st)
        elif method == "OPTIONS":
            self.respond(req, st, 200, extra_headers=[("Allow", ALLOW)])
        elif method == "REGISTER":
            self._on_register(req, st)
        elif method == "BYE":
            self.respond(req, st, 481)
        else:
            self.respond(req, st, 405, extra_headers=[("Allow", ALLOW)])

    def _on_register(self, req: SipMessage, st: ServerTx) -> None:
        if self.registrar is not None and self.registrar.verify(req) is None:
            hdr = self.registrar.challenge_header()
            self.respond(req, st, self.registrar.status, extra_headers=[hdr])
            return
        aor = ""
        with contextlib.suppress(ValueError):
            aor = parse_name_addr(req.get("to") or "").uri
        contacts = req.get_all("contact")
        extra: list[HeaderLike] = [("Contact", c) for c in contacts]
        if req.get("expires") == "0":
            self.registrations.pop(aor, None)
        elif contacts:
            self.registrations[aor] = contacts[0]
        self.respond(req, st, 200, to_tag=new_tag(), extra_headers=extra)

    def _new_incoming(self, req: SipMessage, st: ServerTx) -> None:
        call = IncomingCall(self, req, st)
        st.call = call
        self._dialogs[(call.call_id, call.local_tag)] = call
        self.received.append(req)
        self.incoming.append(call)
        self._invite_q.put_nowait(call)
        self.spawn(self._run_policy(call))

    async def _run_policy(self, call: IncomingCall) -> None:
        policy = self.on_invite
        if policy == "ignore":
            return
        call.trying()
        if callable(policy):
            result = policy(call)
            if inspect.isawaitable(result):
                await result
            return
        if isinstance(policy, int):
            call.reject(policy)
            return
        if policy == "busy":
            call.reject(486)
            return
        if policy == "trying":
            return
        call.ringing()
        if policy == "ring":
            return
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
        call.answer()

    def raw_invites(self, call_id: str, *, initial_only: bool = True) -> list[SipMessage]:
        """Every INVITE datagram received with that Call-ID, before any deduplication
        (retransmissions, relayed duplicates). ``initial_only``: without a To tag."""
        msgs = self.invites_by_call_id.get(call_id, [])
        return [m for m in msgs if not initial_only or m.to_tag is None]

    def invite_count(self, call_id: str, *, initial_only: bool = True) -> int:
        """How many INVITE datagrams arrived for that Call-ID (see :meth:`raw_invites`)."""
        return len(self.raw_invites(call_id, initial_only=initial_only))

    def invite_transactions(self, call_id: str, *, initial_only: bool = True) -> list[str]:
        """Distinct top-Via branches of those INVITEs, in order of arrival: one per
        INVITE transaction the UAS saw."""
        out: list[str] = []
        for m in self.raw_invites(call_id, initial_only=initial_only):
            b = m.branch or ""
            if b not in out:
                out.append(b)
        return out

    async def wait_invite(self, timeout: float = 5.0) -> IncomingCall:
        """Next new incoming call (initial INVITE; retransmissions are not repeated)."""
        return await asyncio.wait_for(self._invite_q.get(), timeout)

    # -- client side ----------------------------------------------------
    def authorization(
        self,
        challenge: SipMessage,
        method: str,
        uri: str,
        *,
        nc: int | None = None,
        cnonce: str | None = None,
        qop: str | None = None,
    ) -> tuple[str, str] | None:
        """(header name, value) answering a 401/407 with MD5 digest, or None.

        A challenge offering ``qop="auth"`` (alone or among others, e.g. ``"auth,auth-int"``)
        is answered with ``qop=auth``, a fresh ``cnonce`` and ``nc``: 00000001 the first
        time a nonce is used, then one more at every reuse of the same nonce (nonce
        counting). A challenge without qop gets the RFC 2069 answer (no nc/cnonce).
        ``nc``/``cnonce``/``qop`` force those values (replays and forgeries in tests);
        a forced ``nc`` does not move the counter. The challenge is remembered as
        ``last_challenge`` (what ``preemptive_auth`` reuses)."""
        if self.password is None:
            return None
        if challenge.status == 407:
            chal, name = challenge.get("proxy-authenticate"), "Proxy-Authorization"
        else:
            chal, name = challenge.get("www-authenticate"), "Authorization"
        if not chal or not chal.strip().lower().startswith("digest"):
            return None
        p = parse_auth_params(chal)
        algorithm = p.get("algorithm", "MD5")
        if algorithm.upper() != "MD5":
            return None
        self.last_challenge = challenge
        realm, nonce = p.get("realm", ""), p.get("nonce", "")
        qops = [q.strip().lower() for q in p.get("qop", "").split(",") if q.strip()]
        use_qop = qop if qop is not None else ("auth" if "auth" in qops else None)
        value = f'Digest username="{self.auth_user}", realm="{realm}", nonce="{nonce}", '
        value += f'uri="{uri}", '
        if use_qop:
            if nc is None:
                self._nc[nonce] = self._nc.get(nonce, 0) + 1
                nc = self._nc[nonce]
            nc_s = f"{nc:08x}"
            cn = cnonce if cnonce is not None else secrets.token_hex(8)
            resp = digest_response(
                self.auth_user, realm, self.password, method, uri, nonce, use_qop, nc_s, cn
            )
            value += f'response="{resp}", algorithm=MD5, cnonce="{cn}", nc={nc_s}, qop={use_qop}'
        else:
            resp = digest_response(self.auth_user, realm, self.password, method, uri, nonce)
            value += f'response="{resp}", algorithm=MD5'
        if "opaque" in p:
            value += f', opaque="{p["opaque"]}"'
        return name, value

    def nonce_count(self, nonce: str) -> int:
        """How many times this UA has answered with that nonce (the last nc sent)."""
        return self._nc.get(nonce, 0)

    def _preemptive(self, method: str, uri: str) -> tuple[str, str] | None:
        if not self.preemptive_auth or self.last_challenge is None:
            return None
        return self.authorization(self.last_challenge, method, uri)

    def _normalise_uri(self, target: str) -> str:
        if ":" in target.split("@", 1)[0] and target.split(":", 1)[0].lower() in (
            "sip",
            "sips",
            "tel",
        ):
            return target
        if "@" in target:
            return f"sip:{target}"
        return f"sip:{target}@{self.domain}"

    async def invite(
        self,
        target_uri: str,
        proxy: Addr | None = None,
        from_user: str | None = None,
        from_header: str | bytes | None = None,
        extra_headers: Sequence[HeaderLike] | None = None,
        auth: bool = True,
        *,
        to_header: str | bytes | None = None,
        body: bytes | None = None,
        call_id: str | None = None,
    ) -> Call:
        """Start a call and return as soon as the INVITE is sent.

        ``target_uri``: full URI, ``user@host`` or just a user (``@domain`` added).
        ``proxy``: where to send (default: the target URI's host:port).
        ``from_header`` / ``to_header``: header values sent verbatim (no tag is added).
        ``body``: None = a tiny SDP, ``b""`` = no body.
        """
        uri = self._normalise_uri(target_uri)
        dest = proxy if proxy is not None else parse_uri(uri).dest
        if from_header is None:
            name = f'"{self.display_name}" ' if self.display_name else ""
            from_header = f"{name}<sip:{from_user or self.user}@{self.domain}>;tag={new_tag()}"
        call = Call(
            self,
            uri,
            dest,
            from_header,
            to_header if to_header is not None else f"<{uri}>",
            extra_headers or (),
            auth,
            make_sdp(self.ip) if body is None else body,
            call_id or f"{secrets.token_hex(12)}@{self.ip}",
        )
        self.calls.append(call)
        self._calls_by_id[call.call_id] = call
        self._dialogs[(call.call_id, call.local_tag)] = call
        call._send_invite(self._preemptive("INVITE", uri) if auth else None)
        return call

    async def register(
        self,
        proxy: Addr,
        expires: int = 3600,
        *,
        contact: str | None = None,
        extra_headers: Sequence[HeaderLike] = (),
        timeout: float = 5.0,
    ) -> SipMessage:
        """REGISTER ``sip:user@domain`` with Contact ``<sip:user@ip:port>``; answers a
        401/407 digest challenge (once, or again on stale=true). Returns the final."""
        aor = f"sip:{self.user}@{self.domain}"
        ruri = f"sip:{self.domain}"
        pre = self._preemptive("REGISTER", ruri)
        auth: list[HeaderLike] = [pre] if pre else []
        tries = 0
        while True:
            self._reg_cseq += 1
            branch = new_branch()
            headers: list[HeaderLike] = [
                ("Via", self.via(branch)),
                ("Max-Forwards", "70"),
                ("From", f"<{aor}>;tag={self._reg_tag}"),
                ("To", f"<{aor}>"),
                ("Call-ID", self._reg_call_id),
                ("CSeq", f"{self._reg_cseq} REGISTER"),
                ("Contact", contact or f"<{self.contact_uri}>"),
                ("Expires", str(expires)),
                ("User-Agent", self.user_agent),
                *auth,
                *extra_headers,
            ]
            data = build_message(f"REGISTER {ruri} SIP/2.0", headers)
            resp = await self.transact(data, proxy, branch, "REGISTER", timeout)
            if resp.status not in (401, 407) or tries >= 3:
                return resp
            chal = resp.get("proxy-authenticate" if resp.status == 407 else "www-authenticate")
            stale = (parse_auth_params(chal or "").get("stale") or "").lower() == "true"
            if tries >= 1 and not stale:
                return resp
            hdr = self.authorization(resp, "REGISTER", ruri)
            if hdr is None:
                return resp
            auth = [hdr]
            tries += 1

    async def unregister(self, proxy: Addr, timeout: float = 5.0) -> SipMessage:
        return await self.register(proxy, expires=0, timeout=timeout)

    async def request(
        self,
        method: str,
        target_uri: str,
        proxy: Addr | None = None,
        *,
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        content_type: str = "application/sdp",
        timeout: float = 5.0,
    ) -> SipMessage:
        """Out-of-dialog non-INVITE request (OPTIONS, MESSAGE, ...); final response."""
        uri = self._normalise_uri(target_uri)
        dest = proxy if proxy is not None else parse_uri(uri).dest
        branch = new_branch()
        headers: list[HeaderLike] = [
            ("Via", self.via(branch)),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.user}@{self.domain}>;tag={new_tag()}"),
            ("To", f"<{uri}>"),
            ("Call-ID", f"{secrets.token_hex(12)}@{self.ip}"),
            ("CSeq", f"1 {method}"),
            ("Contact", f"<{self.contact_uri}>"),
            ("User-Agent", self.user_agent),
            *extra_headers,
        ]
        if body:
            headers.append(("Content-Type", content_type))
        data = build_message(f"{method} {uri} SIP/2.0", headers, body)
        return await self.transact(data, dest, branch, method, timeout)

    async def options(
        self, target_uri: str, proxy: Addr | None = None, timeout: float = 5.0
    ) -> int:
        resp = await self.request("OPTIONS", target_uri, proxy, timeout=timeout)
        assert resp.status is not None
        return resp.status

    # -- forged requests (attacker tests) -------------------------------
    def build_request_raw(
        self,
        method: str,
        ruri: str,
        call_id: str,
        from_tag: str | None,
        to_tag: str | None,
        cseq: int,
        routes: Sequence[str] = (),
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        *,
        branch: str | None = None,
        from_uri: str | None = None,
        to_uri: str | None = None,
        from_header: str | bytes | None = None,
        to_header: str | bytes | None = None,
        cseq_method: str | None = None,
        contact: bool | None = None,
        content_type: str = "application/sdp",
        max_forwards: int = 70,
    ) -> tuple[bytes, str]:
        """A request with every dialog identifier chosen by the caller: (bytes, branch).

        ``routes``: Route header values, one line each, verbatim (``<sip:h;lr;ftag=x>``).
        ``from_tag``/``to_tag``: None leaves the tag out. ``from_uri`` defaults to this
        UA's AOR, ``to_uri`` to ``ruri``; ``from_header``/``to_header`` replace the whole
        value verbatim (the tag arguments are then ignored). ``cseq_method`` defaults to
        ``method``. ``contact``: default for INVITE/UPDATE/SUBSCRIBE/REFER."""
        method = method.upper()
        branch = branch or new_branch()
        from_value = f"<{from_uri or f'sip:{self.user}@{self.domain}'}>"
        if from_tag is not None:
            from_value += f";tag={from_tag}"
        to_value = f"<{to_uri or ruri}>"
        if to_tag is not None:
            to_value += f";tag={to_tag}"
        fv: str | bytes = from_value if from_header is None else from_header
        tv: str | bytes = to_value if to_header is None else to_header
        headers: list[HeaderLike] = [
            ("Via", self.via(branch)),
            ("Max-Forwards", str(max_forwards)),
        ]
        headers += [("Route", r) for r in routes]
        headers += [
            ("From", fv),
            ("To", tv),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {cseq_method or method}"),
        ]
        if contact if contact is not None else method in ("INVITE", "UPDATE", "SUBSCRIBE", "REFER"):
            headers.append(("Contact", f"<{self.contact_uri}>"))
        headers.append(("User-Agent", self.user_agent))
        headers += list(extra_headers)
        if body:
            headers.append(("Content-Type", content_type))
        return build_message(f"{method} {ruri} SIP/2.0", headers, body), branch

    async def request_raw_response(
        self,
        method: str,
        ruri: str,
        dest: Addr,
        call_id: str,
        from_tag: str | None,
        to_tag: str | None,
        cseq: int,
        routes: Sequence[str] = (),
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        *,
        timeout: float = 5.0,
        **kw: Any,
    ) -> SipMessage:
        """Send a forged request (see :meth:`build_request_raw`) to ``dest`` as a client
        transaction (retransmitted per timers E/A) and return its final response.
        An INVITE's final is ACKed: a non-2xx hop by hop (same branch, Request-URI and
        Route set), a 2xx with a new branch to ``dest`` (Request-URI: the 2xx's Contact).
        ACK cannot be sent this way (no response): use ``send_raw(build_request_raw())``.
        Raises TimeoutError when no final response comes."""
        method = method.upper()
        if method == "ACK":
            raise ValueError("ACK has no response: send_raw(*build_request_raw(...)[:1], dest)")
        data, branch = self.build_request_raw(
            method, ruri, call_id, from_tag, to_tag, cseq, routes, extra_headers, body, **kw
        )

        def on_final(resp: SipMessage) -> None:  # every final, retransmissions too
            if method != "INVITE":
                return
            ok = (resp.status or 0) < 300
            ack, _ = self.build_request_raw(
                "ACK",
                (resp.contact_uri or ruri) if ok else ruri,
                call_id,
                from_tag,
                to_tag,
                cseq,
                routes,
                branch=None if ok else branch,
                from_uri=kw.get("from_uri"),
                to_uri=kw.get("to_uri"),
                from_header=kw.get("from_header"),
                to_header=resp.get("to") or kw.get("to_header"),
                contact=False,
            )
            self.send_raw(ack, dest)

        return await self.transact(data, dest, branch, method, timeout, on_final)

    async def request_raw(
        self,
        method: str,
        ruri: str,
        dest: Addr,
        call_id: str,
        from_tag: str | None,
        to_tag: str | None,
        cseq: int,
        routes: Sequence[str] = (),
        extra_headers: Sequence[HeaderLike] = (),
        body: bytes = b"",
        *,
        timeout: float = 5.0,
        **kw: Any,
    ) -> int:
        """Like :meth:`request_raw_response`, returning only the final status code."""
        resp = await self.request_raw_response(
            method,
            ruri,
            dest,
            call_id,
            from_tag,
            to_tag,
            cseq,
            routes,
            extra_headers,
            body,
            timeout=timeout,
            **kw,
        )
        assert resp.status is not None
        return resp.status
