"""A fault-injecting HTTP proxy, in front of the moto S3 server (or the MLflow server): every request is
forwarded, except a seeded share that is answered with a transient error (503 SlowDown, 500
InternalError, as S3 words them), has its connection dropped, or is forwarded late, as a real object
store or tracking server under load does now and then. The session's processes (the tests, Ray's
workers, the cluster's nodes) all reach S3 through one; the share is 0 until a test raises it."""

from __future__ import annotations

import http.client
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop", "slow")
SLOW_SECONDS = 0.5  # a "slow" fault: the request is forwarded after this long
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy(ThreadingHTTPServer):
    """Serves on 127.0.0.1 (`endpoint`), forwarding to `upstream`; `rate` of the requests fail (set it
    with `faults`)."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream).netloc
        self.rate = 0.0
        self.random = random.Random(0)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()  # fault -> how many
        self.forwarded = 0
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @contextmanager
    def faults(self, rate: float, seed: int = 0) -> Iterator[FaultProxy]:
        """Inside the block, `rate` of the requests fail (a seeded draw; counts start at 0)."""
        with self.lock:
            self.rate, self.random, self.injected, self.forwarded = rate, random.Random(seed), Counter(), 0
        try:
            yield self
        finally:
            with self.lock:
                self.rate = 0.0
            print(f"proxy of {self.upstream}: {self.forwarded} forwarded, faults: {dict(self.injected)}")

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about clients that hung up (after a dropped connection, or a timeout of their own)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def fault(self) -> str | None:
        with self.lock:
            fault = self.random.choice(FAULTS) if self.random.random() < self.rate else None
            if fault:
                self.injected[fault] += 1
            else:
                self.forwarded += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        """The request's body, whole: streaming uploads (botocore's aws-chunked PUTs) come chunked."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF closing the chunk
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def _relay(self) -> None:
        body = self._body()
        fault = self.server.fault()
        if fault == "drop":  # the client sees its connection reset, no response
            self.close_connection = True
            return
        if fault == "slow":
            time.sleep(SLOW_SECONDS)
        elif fault:
            status, code, message = _ERRORS[fault]
            xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":  # bytes after a HEAD's answer would be read as the next answer
                self.wfile.write(xml)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            # Forwarded whole, with its length (http.client sets Content-Length), so without the
            # client's "Expect: 100-continue" (answered here already).
            dropped = {*_HOP_BY_HOP, "content-length", "expect"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        head = self.command == "HEAD"  # no body, and the length of the object's (which S3 sizes read)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and (head or key.lower() != "content-length"):
                self.send_header(key, value)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _relay
