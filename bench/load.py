"""HTTP/1.1 load over kept-alive connections, as its own process: `python bench/load.py ...`.

Standard library only, and built on `asyncio.Protocol` callbacks rather than streams, so that
one generator process on one core can outrun the server it measures for as long as possible.
The same generator faces sugard and the baseline server in a run, so whatever it costs, it
costs both alike.

Modes (one JSON object on stdout, read by `bench/run.py`):

- closed loop for `--duration` seconds (after `--warmup`): every connection sends its next
  request as soon as the previous answer is in;
- closed loop for `--count` requests: with `--count` equal to `--connections`, every
  connection opens first and then all send one request at once (a burst);
- paced: `--rate` requests per second for `--duration` seconds, latency measured from when each
  request was due (so a stalled server cannot hide its stall by slowing the generator down).

With `--pid`, the server's CPU time over the measured window is read from /proc/PID/stat.
A `{i}` in `--path` or `--body` becomes the request's index (0, 1, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name is in parentheses and may hold spaces: split after its closing one.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Request:
    """What to send: a method, a path and a body, each may carry `{i}`."""

    def __init__(
        self,
        method: str,
        path: str,
        body: str,
        host: str,
        form: bool,
        headers: tuple[str, ...] = (),
    ) -> None:
        self.templated = "{i}" in path or "{i}" in body
        self._method, self._path, self._body, self._host = method, path, body, host
        self._headers = "".join(f"{h}\r\n" for h in headers)
        self._type = "application/x-www-form-urlencoded" if form else "application/json"
        self._fixed = self._render(0)

    def bytes_for(self, index: int) -> bytes:
        return self._render(index) if self.templated else self._fixed

    def _render(self, index: int) -> bytes:
        path = self._path.replace("{i}", str(index))
        body = self._body.replace("{i}", str(index)).encode()
        head = f"{self._method} {path} HTTP/1.1\r\nHost: {self._host}\r\n{self._headers}"
        if body or self._method != "GET":
            head += f"Content-Type: {self._type}\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body


class Connection(asyncio.Protocol):
    """One kept-alive connection with at most one request in flight."""

    def __init__(self, on_answer: Callable[[Connection, int, bytes], None]) -> None:
        self._on_answer = on_answer
        self._buf = bytearray()
        self._need = -1
        self._body_at = 0
        self._status = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.started = 0.0  # when the request in flight was due (paced) or sent
        self.sent_wall = 0.0
        self.index = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, data: bytes, index: int, due: float | None = None) -> None:
        assert self.transport is not None
        self.index = index
        self.sent_wall = time.time()
        self.started = time.perf_counter() if due is None else due
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self._status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                raise RuntimeError("bench/load.py: an answer without Content-Length")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            self._body_at = end + 4
            self._need = self._body_at + length
        if len(buf) < self._need:
            return
        body = bytes(buf[self._body_at : self._need])
        del buf[: self._need]
        self._need = -1
        self._on_answer(self, self._status, body)


class Run:
    """Collects answers; decides what each connection does next."""

    def __init__(self, args: argparse.Namespace, request: Request) -> None:
        self.args = args
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.latencies: list[float] = []
        self.samples: list[tuple[float, float, int, str]] = []
        self.tokens: collections.Counter[str] = collections.Counter()
        self.next_index = 0
        self.window: tuple[float, float] = (0.0, 0.0)
        self.measuring = False
        self.stopping = False
        self.outstanding = 0
        self.finished = self.loop.create_future()
        self.idle: collections.deque[Connection] = collections.deque()
        self.due: collections.deque[float] = collections.deque()

    def answer(self, conn: Connection, status: int, body: bytes) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        if self.measuring or self.args.count:
            latency = now - conn.started
            self.statuses[status] += 1
            self.latencies.append(latency)
            token = _token_of(body) if self.args.tokens else ""
            if token:
                self.tokens[token] += 1
            if self.args.samples:
                self.samples.append((conn.sent_wall, latency * 1000, status, token))
        if self.args.rate:
            self._paced_next(conn)
        elif self.args.count:
            if self.next_index < self.args.count:
                self._send(conn)
            elif self.outstanding == 0 and not self.finished.done():
                self.finished.set_result(None)
        elif not self.stopping:
            self._send(conn)
        elif self.outstanding == 0 and not self.finished.done():
            self.finished.set_result(None)

    def _send(self, conn: Connection, due: float | None = None) -> None:
        index = self.next_index
        self.next_index += 1
        self.outstanding += 1
        conn.send(self.request.bytes_for(index), index, due)

    def _paced_next(self, conn: Connection) -> None:
        if self.due:
            self._send(conn, self.due.popleft())
        else:
            self.idle.append(conn)
        self.check_finished()

    def check_finished(self) -> None:
        done = self.stopping and self.outstanding == 0 and not self.due
        if done and not self.finished.done():
            self.finished.set_result(None)

    def release(self, due: float) -> None:
        """A paced request is due: send it on an idle connection, or queue it."""
        if self.idle:
            self._send(self.idle.popleft(), due)
        else:
            self.due.append(due)


def _token_of(body: bytes) -> str:
    """A short hash of the access token in a JSON answer: enough to count distinct tokens."""
    try:
        value = json.loads(body).get("access_token")
    except (ValueError, AttributeError):
        return ""
    return hashlib.sha256(value.encode()).hexdigest()[:12] if isinstance(value, str) else ""


async def connect(args: argparse.Namespace, factory: Callable[[], Connection]) -> Connection:
    loop = asyncio.get_running_loop()
    if args.unix:
        _, proto = await loop.create_unix_connection(factory, args.unix)
    else:
        host, _, port = args.tcp.rpartition(":")
        _, proto = await loop.create_connection(factory, host, int(port))
    return proto


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    raise_open_files()
    request = Request(args.method, args.path, args.body, args.host, args.form, tuple(args.header))
    run = Run(args, request)
    conns = await asyncio.gather(
        *(connect(args, lambda: Connection(run.answer)) for _ in range(args.connections))
    )
    cpu_server = cpu_client = 0.0
    started = time.perf_counter()
    if args.count:
        cpu_before = cpu_seconds(args.pid) if args.pid else 0.0
        client_before = time.process_time()
        for conn in conns[: args.count]:
            run._send(conn)
        await run.finished
        ended = time.perf_counter()
        cpu_server = (cpu_seconds(args.pid) - cpu_before) if args.pid else 0.0
        cpu_client = time.process_time() - client_before
    else:
        run.measuring = args.warmup <= 0
        if args.rate:
            run.idle.extend(conns)
            pacer = asyncio.create_task(_pace(run, args.rate, args.warmup + args.duration))
        else:
            for conn in conns:
                run._send(conn)
        await asyncio.sleep(args.warmup)
        run.measuring = True
        cpu_before = cpu_seconds(args.pid) if args.pid else 0.0
        client_before = time.process_time()
        started = time.perf_counter()
        await asyncio.sleep(args.duration)
        run.measuring = False
        ended = time.perf_counter()
        cpu_server = (cpu_seconds(args.pid) - cpu_before) if args.pid else 0.0
        cpu_client = time.process_time() - client_before
        if args.rate:
            await pacer
        run.stopping = True
        run.check_finished()
        if run.outstanding and not run.finished.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.finished), 30)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return summary(run, ended - started, cpu_server, cpu_client)


async def _pace(run: Run, rate: float, seconds: float) -> None:
    """Release one request every 1/rate s on schedule, however late the answers come."""
    start = time.perf_counter()
    total = int(rate * seconds)
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.release(due)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 for an empty list)."""
    if not values:
        return 0.0
    rank = max(0, min(len(values) - 1, math.ceil(share * len(values)) - 1))
    return values[rank]


def summary(run: Run, seconds: float, cpu_server: float, cpu_client: float) -> dict[str, Any]:
    lat = sorted(run.latencies)
    done = len(lat)
    return {
        "requests": done,
        "seconds": seconds,
        "rps": done / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": (lat[-1] if lat else 0.0) * 1000,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "server_cpu_s": cpu_server,
        "client_cpu_s": cpu_client,
        "tokens": dict(run.tokens),
        "samples": run.samples,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="SOCKET", help="connect to this Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="connect over TCP")
    p.add_argument("--host", default="sugard", help="the Host header")
    p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--body", default="")
    p.add_argument("--form", action="store_true", help="the body is form-encoded, not JSON")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=0.0, help="seconds to measure")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring")
    p.add_argument("--count", type=int, default=0, help="send exactly this many requests")
    p.add_argument("--rate", type=float, default=0.0, help="requests per second (paced)")
    p.add_argument("--pid", type=int, default=0, help="the server, whose CPU time to read")
    p.add_argument("--tokens", action="store_true", help="count distinct access tokens")
    p.add_argument("--samples", action="store_true", help="report every request's timing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if bool(args.count) == bool(args.duration):
        print("load.py: give either --count or --duration", file=sys.stderr)
        return 2
    if args.count and args.connections > args.count:
        args.connections = args.count
    result = asyncio.run(generate(args))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
