"""A tiny HTTP-aware TCP proxy that injects real network faults (resets, 500s) in front of an S3 server."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["pass", "reset_request", "reset_response", "error_500"]

_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InternalError</Code><Message>injected by faultproxy</Message></Error>"
)


@dataclass
class Rule:
    """Fault for requests whose method matches and whose head contains ``contains``.

    ``skip`` matching requests pass first, then ``times`` are faulted. ``after`` is how many
    body bytes are forwarded before a reset. Every matching request is counted in ``seen``.
    """

    method: str
    contains: str
    action: Action
    times: int = 1
    skip: int = 0
    after: int = 0
    seen: int = 0
    fired: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def decide(self, method: str, head: str) -> bool:
        if method != self.method or self.contains not in head:
            return False
        with self.lock:
            self.seen += 1
            if self.seen > self.skip and self.fired < self.times:
                self.fired += 1
                return True
        return False


def _rst(sock: socket.socket) -> None:
    """Close with an RST (connection reset by peer) instead of a clean FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # shutdown wakes the other thread's blocked recv on this socket; without it close() is deferred.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Listens on 127.0.0.1 and forwards to ``upstream``; requests matching a rule get its fault."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _rst(client)
            return
        cut = {"after": -1}
        threading.Thread(target=self._pipe_back, args=(upstream, client, cut), daemon=True).start()
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(65536)
                    if not data:
                        upstream.shutdown(socket.SHUT_WR)
                        return
                    buffer += data
                head_bytes, _, buffer = buffer.partition(b"\r\n\r\n")
                head = head_bytes.decode("latin-1")
                method = head.split(" ", 1)[0]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
                }
                if "chunked" in headers.get("transfer-encoding", ""):
                    upstream.sendall(head_bytes + b"\r\n\r\n" + buffer)
                    self._pipe(client, upstream)
                    return
                length = int(headers.get("content-length", "0") or 0)
                with self._lock:
                    self.requests += 1
                rule = next((r for r in self.rules if r.decide(method, head)), None)
                if rule is not None and rule.action == "error_500":
                    self._drain(client, length - len(buffer))
                    client.sendall(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(_ERROR_BODY)}\r\nConnection: close\r\n\r\n".encode()
                        + _ERROR_BODY
                    )
                    client.close()
                    upstream.close()
                    return
                if rule is not None and rule.action == "reset_response":
                    # Armed before the request goes upstream: armed after it, a fast answer could be relayed whole
                    # while this thread waited for the CPU (a loaded machine), and the fault never happened.
                    cut["after"] = rule.after
                upstream.sendall(head_bytes + b"\r\n\r\n")
                if rule is not None and rule.action == "reset_request":
                    self._forward(client, upstream, buffer, min(rule.after, length))
                    _rst(client)
                    _rst(upstream)
                    return
                self._forward(client, upstream, buffer, length)
                buffer = buffer[length:] if len(buffer) > length else b""
        except OSError:
            _rst(client)
            upstream.close()

    @staticmethod
    def _drain(client: socket.socket, remaining: int) -> None:
        while remaining > 0:
            data = client.recv(min(65536, remaining))
            if not data:
                return
            remaining -= len(data)

    @staticmethod
    def _forward(client: socket.socket, upstream: socket.socket, buffered: bytes, length: int) -> int:
        first = buffered[:length]
        upstream.sendall(first)
        sent = len(first)
        while sent < length:
            data = client.recv(min(65536, length - sent))
            if not data:
                break
            upstream.sendall(data)
            sent += len(data)
        return sent

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _pipe_back(upstream: socket.socket, client: socket.socket, cut: dict[str, int]) -> None:
        sent = 0
        try:
            while data := upstream.recv(65536):
                if cut["after"] >= 0 and sent + len(data) > cut["after"]:
                    client.sendall(data[: max(0, cut["after"] - sent)])
                    _rst(client)
                    upstream.close()
                    return
                client.sendall(data)
                sent += len(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            try:
                _rst(client)
            except OSError:
                pass
        finally:
            upstream.close()
