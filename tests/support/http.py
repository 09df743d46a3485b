"""HTTP on the daemon's Unix socket as scripts speak it: curl, requests, and what `ss` sees."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from support.wait import wait_for


def run_curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`curl -sS ARGS`, its exit code left to the caller."""
    return subprocess.run(
        ["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def curl(socket: Path, path: str, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    """`curl --unix-socket SOCKET [ARGS] http://sugard PATH`, as a script would run it: the
    HTTP status and the body."""
    done = run_curl(
        "-w",
        "\n%{http_code}",
        "--unix-socket",
        str(socket),
        *args,
        f"http://sugard{path}",
        timeout=timeout,
    )
    assert 0 == done.returncode, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def curl_json(socket: Path, path: str, *args: str, timeout: float = 60.0) -> tuple[int, Any]:
    """`curl` over the socket, the body read as JSON."""
    status, body = curl(socket, path, *args, timeout=timeout)
    return status, json.loads(body)


def accepted_connections(socket: Path) -> dict[str, int]:
    """The connections the daemon on `socket` has accepted (`ss`): inode -> bytes sent on it
    that the daemon has not read yet."""
    out = subprocess.run(
        ["ss", "-xnH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        # Netid Recv-Q Send-Q Local-Address Inode Peer-Address Peer-Inode
        if len(fields) >= 5 and fields[3] == str(socket):
            found[fields[4]] = int(fields[1])
    return found


def wait_until_read(socket: Path, before: Mapping[str, int], what: str = "the request") -> None:
    """Until the daemon on `socket` has accepted a connection not in `before` (a snapshot of
    `accepted_connections`) and read all that was sent on it: the request is in the daemon's
    hands, not on its way (its client may still be starting, on a busy machine)."""
    wait_for(
        lambda: any(
            unread == 0
            for inode, unread in accepted_connections(socket).items()
            if inode not in before
        ),
        what=f"{what} to reach the daemon",
    )


def unix_session(path: Path) -> requests.Session:
    """A requests session whose http://sugard URLs go to the Unix socket at `path`."""

    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(str(path))
            return sock

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    pool = Pool("sugard")

    class Adapter(HTTPAdapter):
        def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Pool:
            return pool

        def close(self) -> None:
            pool.close()
            super().close()

    session = requests.Session()
    session.mount("http://sugard", Adapter())
    return session
