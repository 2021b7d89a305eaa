#!/usr/bin/env python3
"""Wait until a SIP server answers an OPTIONS request over UDP.

    scripts/sip-ping.py [HOST [PORT [TIMEOUT_SECONDS]]]   (default 127.0.0.1 5060 20)

Any SIP response counts (200, 404, 403, ...): we only want to know that
Kamailio is up and reading its socket. Exit 0 on a reply, 1 on timeout.
Standard library only, so it works before the venv exists.
"""

import socket
import sys
import time
import uuid


def probe(host: str, port: int, wait: float) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        lport = sock.getsockname()[1]
        tag = uuid.uuid4().hex[:10]
        msg = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{tag};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@127.0.0.1>;tag={tag}\r\n"
            f"To: <sip:{host}:{port}>\r\n"
            f"Call-ID: {tag}@127.0.0.1\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "User-Agent: sip-ping\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        sock.settimeout(wait)
        sock.sendto(msg.encode(), (host, port))
        try:
            data, _ = sock.recvfrom(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        return line if line.startswith("SIP/2.0 ") else None


def main() -> int:
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 5060
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = probe(host, port, 0.5)
        if status:
            print(status)
            return 0
        time.sleep(0.2)
    print(f"no SIP reply from {host}:{port} within {timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
