"""A real Debian `redis-server` for the fleet tests: its own unix socket in a temp dir, no disk
(`--save "" --appendonly no`), and the levers the tests pull: stop, SIGSTOP/SIGCONT, restart
empty, an ACL user with the least rights, TLS."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")
ADMIN, ADMIN_PASSWORD = "admin", "admin-pw-for-tests"
# The least rights sugard needs (docs/fleet.md): its keys and channels only, and the commands
# it sends, including those its Lua scripts call (Redis checks those too).
SUGARD_RIGHTS = (
    "resetkeys ~sugard:* resetchannels &sugard:* -@all "
    "+ping +get +set +hmget +hget +hset +del +pexpire +publish +subscribe +unsubscribe "
    "+evalsha +script|load +client|setname "
    "+time +hgetall +hdel +zadd +zcard +zrange +zremrangebyscore"
)


class RedisServer:
    """One redis-server process; `url` reaches it over its unix socket."""

    def __init__(self, directory: Path, *extra: str) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.extra = extra
        self.restricted = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"
        self.start()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log_path),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.restricted = False
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.admin().ping():
                    return
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 15 s")
            time.sleep(0.02)

    def admin(self) -> redis.Redis:
        """A client with every right, for the test to look and pull levers."""
        auth = {"username": ADMIN, "password": ADMIN_PASSWORD} if self.restricted else {}
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5, **auth)

    def restrict(self, user: str, password: str, rights: str = SUGARD_RIGHTS) -> None:
        """Turn the passwordless default user off; add an admin and `user` with `rights`."""
        with self.admin() as client:
            client.execute_command(
                "ACL", "SETUSER", ADMIN, "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"
            )
            client.execute_command(
                "ACL", "SETUSER", user, "reset", "on", f">{password}", *rights.split()
            )
            client.execute_command("ACL", "SETUSER", "default", "off")
        self.restricted = True

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(15)

    def restart_empty(self) -> None:
        """Redis gone and back without its data, as after a restart with no persistence."""
        self.stop()
        self.start()

    def dump(self) -> bytes:
        """Every key and every value in the store, as bytes, to search for what must not be."""
        out = b""
        with self.admin() as client:
            for key in client.scan_iter(count=1000):
                kind = client.type(key)
                out += key + b"\n"
                if kind == b"string":
                    out += client.get(key) or b""
                elif kind == b"hash":
                    for k, v in client.hgetall(key).items():
                        out += k + b"=" + v + b"\n"
                elif kind == b"list":
                    out += b"\n".join(client.lrange(key, 0, -1))
                elif kind == b"zset":
                    out += b"\n".join(client.zrange(key, 0, -1))
                else:
                    raise AssertionError(f"unexpected {kind!r} at {key!r}")
        return out


def free_port() -> int:
    """A port the kernel says is free now, for redis-server's TLS listener (it cannot report
    the one it picked for --tls-port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
