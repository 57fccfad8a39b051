"""A fault-injection proxy for the worker API: a small real HTTP/1.1 proxy on 127.0.0.1 that
workers reach instead of the server (the server's CORTEX_PUBLIC_URL names it), and that loses
the requests or answers a `Fault` picks, the way a proxy that closes a connection loses them.

`Fault` also serves the contract tests, which lose the same messages on the store adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable
from typing import Any

# What a fault does to a message it strikes: lose it (close the connection), or answer in the
# server's place with (status, body).
Action = str | tuple[int, dict[str, Any]]


@dataclasses.dataclass
class Fault:
    """Strike one kind of message, the first `times` it is seen, where it is seen: "request"
    (it never reaches the server) or "answer" (the server acted on it; its answer is lost).

    Kinds: "lease" (a lease that reports nothing; its answer when it leased batches),
    "results" (a lease that reports results), "hook-claim" (the answer that tells a worker to
    run on_job_complete), "hook" (the hook's report), "state", "logs", "heartbeat", "spec".
    `action` is what happens to a message struck; `before` runs first (it may block: the
    proxy holds the message meanwhile).
    """

    kind: str
    where: str
    times: int = 2
    action: Action = "lose"
    before: Callable[[], None] | None = None
    struck: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def strikes(self, op: str, body: dict[str, Any] | None, answer: Any = None) -> bool:
        """Whether this message (`answer` None: the request) is one to strike now."""
        where = "request" if answer is None else "answer"
        if where != self.where or not is_kind(self.kind, op, body or {}, answer):
            return False
        with self.lock:
            if self.struck >= self.times:
                return False
            self.struck += 1
            return True


def is_kind(kind: str, op: str, body: dict[str, Any], answer: Any) -> bool:
    """Whether a message is of `kind`; `answer` is None while the request is sent."""
    if kind == "lease":
        return op == "lease" and not body.get("results") and (answer is None or answer["batches"])
    if kind == "results":
        return op == "lease" and bool(body.get("results"))
    if kind == "hook-claim":
        return op == "lease" and answer is not None and bool(answer.get("run_hook"))
    return op == kind


@dataclasses.dataclass
class _Message:
    head: bytes  # the request or status line
    headers: list[tuple[str, str]]
    body: bytes


class FaultProxy:
    """Forwards every request to `upstream` (one connection each) and answers on the worker's
    keep-alive connection; `fault` (set and replaced by the test) picks messages to strike."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fault: Fault | None = None
        self.seen: list[tuple[str, int]] = []  # (op, status) of every answer passed on
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> FaultProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", port), self._loop
        )
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        """Stop listening, and wait for a fault's `before` still running (a server restart
        started after its test gave up must not outlive the test's clean-up)."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            await self._loop.shutdown_default_executor()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read(reader, request=True)
                if request is None:
                    return
                if not await self._exchange(request, writer):
                    return  # the connection was closed on purpose
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _exchange(self, request: _Message, writer: asyncio.StreamWriter) -> bool:
        op = request.head.split()[1].decode().rstrip("/").rsplit("/", 1)[-1]
        body = _json(request.body) if request.body else None
        fault = self.fault
        if fault is not None and fault.strikes(op, body):
            return await self._strike(fault, writer)
        answer = await self._forward(request)
        status = int(answer.head.split()[1])
        parsed = _json(answer.body) if status < 300 else None
        if fault is not None and parsed is not None and fault.strikes(op, body, parsed):
            return await self._strike(fault, writer)
        self.seen.append((op, status))
        writer.write(_encode(answer))
        await writer.drain()
        return True

    async def _strike(self, fault: Fault, writer: asyncio.StreamWriter) -> bool:
        if fault.before is not None:
            await self._loop.run_in_executor(None, fault.before)
        if fault.action == "lose":
            return False
        status, body = fault.action
        data = json.dumps(body).encode()
        reply = _Message(
            f"HTTP/1.1 {status} Refused".encode(), [("content-type", "application/json")], data
        )
        writer.write(_encode(reply))
        await writer.drain()
        return True

    async def _forward(self, request: _Message) -> _Message:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            writer.write(_encode(request, close=True))
            await writer.drain()
            answer = await _read(reader, request=False)
        finally:
            writer.close()
        if answer is None:
            raise ConnectionError("the server closed the connection without answering")
        return answer


async def _read(reader: asyncio.StreamReader, *, request: bool) -> _Message | None:
    """One HTTP/1.1 message: its first line, headers and body (by length, or chunked)."""
    head = await reader.readline()
    if not head.strip():
        return None
    headers = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    fields = dict(headers)
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    elif "content-length" in fields:
        body = await reader.readexactly(int(fields["content-length"]))
    else:
        body = b"" if request else await reader.read()
    return _Message(head.rstrip(b"\r\n"), headers, body)


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _encode(message: _Message, close: bool = False) -> bytes:
    lines = [message.head]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in message.headers if k not in _HOP]
    lines.append(f"content-length: {len(message.body)}".encode())
    lines.append(b"connection: close" if close else b"connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n" + message.body


def _json(data: bytes) -> Any:
    with contextlib.suppress(ValueError):
        return json.loads(data)
    return None
