"""What the proxy costs: Sugar through sugard vs straight to Sugar, side by side in one run.

    .venv/bin/python -m bench.bench_proxy            # full sizes (about a minute and a half)
    .venv/bin/python -m bench.bench_proxy --quick    # tiny sizes, a few seconds

Upstream is the fake SugarCRM (`sugard.testing`) on 127.0.0.1 in a thread of this process; the
daemon is the real `sugard run`, its proxy on the Unix socket and on a loopback listener; the
load is `bench/load.py` as a process of its own, the same generator for every target. The
request is `GET /rest/v10/ping` (the fake checks the token and answers "pong"): direct with the
token in `OAuth-Token`, proxied without one. Rounds are interleaved and the median reported.

Streams: a second instance points at a small streaming upstream in this process; a 200 MB
download and a 200 MB upload go through the listener while the daemon's VmRSS/VmHWM are read.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from aiohttp import web

from sugard.client import DaemonUnreachable, SugardClient
from sugard.testing import running_fake

HERE = Path(__file__).resolve().parent
SUGARD = Path(sys.executable).parent / "sugard"
PASSWORD = "bench-password"  # noqa: S105 (the fake's user's, nobody else's)
BLOCK = bytes(range(256)) * 4096  # 1 MiB
STREAM_TOKEN = "stream-bench-token"  # noqa: S105 (the streaming upstream's only token)


@dataclass(frozen=True)
class Sizes:
    seconds: float = 3.0
    warmup: float = 0.5
    rounds: int = 3
    connections: int = 16
    stream_mib: int = 200


QUICK = Sizes(seconds=0.3, warmup=0.1, rounds=1, stream_mib=8)


def stream_app() -> web.Application:
    """A Sugar stand-in for streams: any login gets one token; 1 MiB blocks down, a hash up."""

    async def token(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {
                "access_token": STREAM_TOKEN,
                "expires_in": 3600,
                "token_type": "bearer",
                "scope": None,
                "refresh_token": "stream-bench-refresh",
                "refresh_expires_in": 1209600,
                "download_token": "stream-bench-download",
            }
        )

    async def download(request: web.Request) -> web.StreamResponse:
        mib = int(request.match_info["mib"])
        response = web.StreamResponse()
        response.content_length = mib * len(BLOCK)
        await response.prepare(request)
        for _ in range(mib):
            await response.write(BLOCK)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    app = web.Application()
    app.router.add_post("/rest/v10/oauth2/token", token)
    app.router.add_get("/rest/v10/Download/{mib}", download)
    app.router.add_post("/rest/v10/Upload", upload)
    return app


@contextmanager
def running_app(app: web.Application) -> Iterator[str]:
    """`app` on 127.0.0.1 in a thread; yields its URL."""
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, str]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        ready.set_result((asyncio.get_running_loop(), stop, f"http://{host}:{port}"))
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, url = ready.result(timeout=10)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def load(target: list[str], *, pid: int, connections: int, sizes: Sizes) -> dict[str, Any]:
    """One closed-loop run of bench/load.py against `target` (its where/what arguments)."""
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "load.py"),
            *target,
            "--connections",
            str(connections),
            "--duration",
            str(sizes.seconds),
            "--warmup",
            str(sizes.warmup),
            "--pid",
            str(pid),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    if set(result["statuses"]) != {"200"}:
        raise RuntimeError(f"answers other than 200 from {target}: {result['statuses']}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("bench/proxy_floor.py did not start") from None
            time.sleep(0.05)


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def stream_through(url: str, pid: int, mib: int) -> dict[str, float]:
    """A `mib` MiB download and upload through the listener at `url`, byte-exact, and the
    daemon's RSS before and its peak growth over them."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def download(size: int) -> str:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("GET", f"/rest/v10/Download/{size}")
        answer = conn.getresponse()
        digest = hashlib.sha256()
        while chunk := answer.read(1 << 20):
            digest.update(chunk)
        conn.close()
        return digest.hexdigest()

    def upload(size: int) -> dict[str, Any]:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.putrequest("POST", "/rest/v10/Upload")
        conn.putheader("Content-Length", str(size * len(BLOCK)))
        conn.endheaders()
        for _ in range(size):
            conn.send(BLOCK)
        result: dict[str, Any] = json.loads(conn.getresponse().read())
        conn.close()
        return result

    expected = hashlib.sha256()
    for _ in range(mib):
        expected.update(BLOCK)
    download(4)
    upload(4)  # warm: the first requests allocate what every later one reuses
    before = vm_kib(pid, "VmRSS")
    started = time.perf_counter()
    if download(mib) != expected.hexdigest():
        raise RuntimeError("the download through the proxy is not byte-exact")
    down_s = time.perf_counter() - started
    started = time.perf_counter()
    if upload(mib) != {"sha256": expected.hexdigest(), "size": mib * len(BLOCK)}:
        raise RuntimeError("the upload through the proxy is not byte-exact")
    up_s = time.perf_counter() - started
    return {
        "rss_before_mib": before / 1024,
        "growth_mib": (vm_kib(pid, "VmHWM") - before) / 1024,
        "down_mib_s": mib / down_s,
        "up_mib_s": mib / up_s,
    }


def start_daemon(
    directory: Path, fake_url: str, stream_url: str
) -> tuple[subprocess.Popen[bytes], Path]:
    password = directory / "bench.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    common = {"username": "bench", "password_file": str(password)}
    config = directory / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "daemon": {"log_level": "warning"},
                "instances": {
                    "bench": {"url": fake_url, "listen": "127.0.0.1:0", **common},
                    "stream": {"url": stream_url, "listen": "127.0.0.1:0", **common},
                },
            }
        )
    )
    config.chmod(0o600)
    socket_path = directory / "s.sock"
    proc = subprocess.Popen(
        [str(SUGARD), "run", "-c", str(config), "--socket", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with SugardClient(socket_path, timeout=2) as client:
                client.token("bench", wait=10)
                client.token("stream", wait=10)
            return proc, socket_path
        except DaemonUnreachable:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("sugard did not start") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    with (
        running_fake(users={"bench": PASSWORD}) as fake,
        running_app(stream_app()) as stream_url,
        tempfile.TemporaryDirectory(prefix="sd-bp-") as tmp,
    ):
        proc, socket_path = start_daemon(Path(tmp), fake.url, stream_url)
        try:
            with SugardClient(socket_path) as client:
                token = client.token("bench")["access_token"]
                listen = client.proxy_urls("bench")["listen_url"]
                stream_listen = client.proxy_urls("stream")["listen_url"]
            fake_host = fake.url.removeprefix("http://")
            listen_host = listen.removeprefix("http://")
            floor_port = free_port()
            floor = subprocess.Popen(
                [sys.executable, str(HERE / "proxy_floor.py"), fake.url, token, str(floor_port)]
            )
            wait_listening(floor_port)
            floor_host = f"127.0.0.1:{floor_port}"
            targets = {
                "direct": [
                    "--tcp",
                    fake_host,
                    "--host",
                    fake_host,
                    "--header",
                    f"OAuth-Token: {token}",
                    "--path",
                    "/rest/v10/ping",
                ],
                "listener": [
                    "--tcp",
                    listen_host,
                    "--host",
                    listen_host,
                    "--path",
                    "/rest/v10/ping",
                ],
                "aiohttp floor": [
                    "--tcp",
                    floor_host,
                    "--host",
                    floor_host,
                    "--path",
                    "/rest/v10/ping",
                ],
                "socket": [
                    "--unix",
                    str(socket_path),
                    "--path",
                    "/v1/instances/bench/rest/v10/ping",
                ],
            }
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for _ in range(sizes.rounds):
                for connections in (1, sizes.connections):
                    for name, target in targets.items():
                        pid = floor.pid if name == "aiohttp floor" else proc.pid
                        runs.setdefault((name, connections), []).append(
                            load(target, pid=pid, connections=connections, sizes=sizes)
                        )
            floor.terminate()
            floor.wait(30)
            streams = stream_through(stream_listen, proc.pid, sizes.stream_mib)
        finally:
            proc.terminate()
            proc.wait(30)
    report(runs, streams, sizes)
    return 0


def report(
    runs: dict[tuple[str, int], list[dict[str, Any]]], streams: dict[str, float], sizes: Sizes
) -> None:
    n = sizes.connections
    direct1, directn = runs[("direct", 1)], runs[("direct", n)]
    print(f"GET /rest/v10/ping, {sizes.rounds} round(s) of {sizes.seconds:g} s, medians\n")
    proxies = ("listener", "socket", "aiohttp floor")
    print("| measure | direct | via listener | via socket | aiohttp floor | goal |")
    print("|---|---|---|---|---|---|")
    for key, label in (
        ("p50_ms", "p50 latency, 1 connection"),
        ("p99_ms", "p99 latency, 1 connection"),
    ):
        base = median_of(direct1, key)
        cells = [f"{base:.2f} ms"]
        for name in proxies:
            value = median_of(runs[(name, 1)], key)
            cells.append(f"{value:.2f} ms ({value - base:+.2f})")
        goal = "< 1 ms added" if key == "p50_ms" else ""
        print(f"| {label} | {' | '.join(cells)} | {goal} |")
    base = median_of(directn, "rps")
    cells = [f"{base:,.0f}/s"]
    for name in proxies:
        value = median_of(runs[(name, n)], "rps")
        cells.append(f"{value:,.0f}/s ({value / base:.2f}x)")
    print(f"| throughput, {n} connections | {' | '.join(cells)} | >= 0.7x direct |")
    cells = ["-"]
    for name in proxies:
        per = [r["server_cpu_s"] / r["requests"] * 1e6 for r in runs[(name, n)] if r["requests"]]
        cells.append(f"{statistics.median(per):.0f} us")
    print(f"| CPU per proxied request (the proxy's process) | {' | '.join(cells)} | |")
    print(
        f"| daemon RSS growth, {sizes.stream_mib} MiB down + up | - | "
        f"{streams['growth_mib']:.1f} MiB (from {streams['rss_before_mib']:.0f} MiB; "
        f"{streams['down_mib_s']:.0f} MiB/s down, {streams['up_mib_s']:.0f} MiB/s up) | - | - | "
        "< 32 MiB |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
