"""A fault-injecting HTTP proxy in front of a real S3 server (moto's standalone server).

Clients are pointed at the proxy's URL instead of the server's; the proxy forwards each request
and, for a stated share of them (exactly that share, spread evenly, the kinds in turn, so a run
is repeatable), fails it the way S3 fails:

- `slowdown`: 503 SlowDown (S3's throttling answer), the request never reaches the server;
- `internal`: 500 InternalError, never reaches the server;
- `reset`: the request IS applied by the server, then the client's connection is reset before
  any response (the client cannot know whether its write happened, so it must be idempotent);
  for a GET with a body, the headers and part of the body are sent first, then the reset;
- `stall`: the response is held back for `stall_s` seconds (slow, or past the client's read
  timeout when stall_s exceeds it), then sent.

Requests are classed as read (GET/HEAD of an object), list (GET of a bucket), write
(PUT/POST/DELETE). `counts()` (or `GET /__faults__` on the proxy) says how many requests of each
class passed and how many faults of each kind landed, so a test proves its faults landed.

Run standalone: `python tests/s3_faults.py --upstream http://127.0.0.1:5000 --port 5100 --rate 0.05`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("slowdown", "internal", "reset", "stall")

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>FAULT{n}</RequestId></Error>"
)


@dataclass
class FaultPlan:
    rate: float = 0.0  # share of requests that fail
    kinds: tuple[str, ...] = KINDS  # drawn uniformly among these
    stall_s: float = 2.0
    seed: int = 0  # which kind comes first
    classes: tuple[str, ...] = ("read", "list", "write")  # which request classes may fail


@dataclass
class _State:
    plan: FaultPlan
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)  # class -> requests seen
    faults: Counter = field(default_factory=Counter)  # "kind:class" -> faults injected
    eligible: int = 0  # requests of the classes that may fail, seen so far

    def draw(self, cls: str) -> str | None:
        """Exactly `rate` of the eligible requests fail, spread evenly (request n fails when
        floor(n * rate) steps up), so a short run gets its share too; the kinds take turns
        (starting at `seed`), so every kind lands once four faults have."""
        with self.lock:
            self.requests[cls] += 1
            plan = self.plan
            if cls not in plan.classes or plan.rate <= 0:
                return None
            self.eligible += 1
            n = self.eligible
            if int(n * plan.rate) == int((n - 1) * plan.rate):
                return None
            kind = plan.kinds[(plan.seed + sum(self.faults.values())) % len(plan.kinds)]  # each kind in turn
            self.faults[f"{kind}:{cls}"] += 1
            return kind


def request_class(method: str, path: str) -> str:
    parsed = urllib.parse.urlsplit(path)
    key = parsed.path.lstrip("/").split("/", 1)
    if method in ("GET", "HEAD"):
        return "read" if len(key) == 2 and key[1] else "list"
    return "write"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _ProxyServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        if self.path.startswith("/__faults__"):
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(self.server.counts()).encode())
            return
        cls = request_class(self.command, self.path)
        kind = self.server.state.draw(cls)
        if kind in ("slowdown", "internal"):
            code, message, status = (
                ("SlowDown", "Please reduce your request rate.", 503)
                if kind == "slowdown"
                else ("InternalError", "We encountered an internal error. Please try again.", 500)
            )
            xml = _ERROR_XML.format(code=code, message=message, n=sum(self.server.state.faults.values())).encode()
            self._reply(status, {"Content-Type": "application/xml"}, b"" if self.command == "HEAD" else xml)
            return
        status, headers, data = self._forward(body)
        if kind == "stall":
            time.sleep(self.server.state.plan.stall_s)
        if kind == "reset":
            if self.command == "GET" and len(data) > 16:  # a body cut off mid-transfer
                self._send_head(status, headers, len(data))
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            self._reset()
            return
        self._reply(status, headers, data, head=self.command == "HEAD")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")}
            return resp.status, out, data
        finally:
            conn.close()

    def _send_head(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _reply(self, status: int, headers: dict[str, str], data: bytes, head: bool = False) -> None:
        length = int(headers.get("Content-Length", headers.get("content-length", len(data)))) if head else len(data)
        self._send_head(status, headers, length)
        if not head and data:
            self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends a RST, as a dropped connection looks to the client.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, upstream: str, plan: FaultPlan):
        super().__init__(addr, _Handler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.state = _State(plan)

    def counts(self) -> dict:
        with self.state.lock:
            # `eligible`: requests the current plan could fail; exactly floor(eligible * rate) did.
            return {
                "requests": dict(self.state.requests),
                "faults": dict(self.state.faults),
                "eligible": self.state.eligible,
            }

    def handle_error(self, request, client_address) -> None:
        # A client that gave up on a stalled response closes its end: expected, not an error.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """The proxy in a background thread of this process. `url` is what clients use."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, port: int = 0):
        self.server = _ProxyServer(("127.0.0.1", port), upstream, plan or FaultPlan())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def set_plan(self, plan: FaultPlan) -> None:
        with self.server.state.lock:
            self.server.state.plan = plan
            self.server.state.eligible = 0

    def counts(self) -> dict:
        return self.server.counts()

    def reset_counts(self) -> None:
        with self.server.state.lock:
            self.server.state.requests.clear()
            self.server.state.faults.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fault_total(counts: dict, kind: str | None = None, cls: str | None = None) -> int:
    return sum(
        n
        for key, n in counts["faults"].items()
        if (kind is None or key.split(":")[0] == kind) and (cls is None or key.split(":")[1] == cls)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--stall-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream, FaultPlan(args.rate, stall_s=args.stall_s, seed=args.seed), args.port)
    print(proxy.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.close()


if __name__ == "__main__":
    main()
