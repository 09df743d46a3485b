"""The default sockets, as a client finds them: `$XDG_RUNTIME_DIR/sugard/sugard.sock`, then
`/tmp/sugard-UID/sugard.sock`, the first that answers; and at those paths only a daemon of the
client's own uid (or root's) is trusted. Each test runs in a private /tmp (support.private_tmp),
so the fixed fallback path is the test's own."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from support.daemon import SUGARCTL, SUGARD, instance, write_config
from support.nobody import NOBODY
from support.private_tmp import in_private_tmp

from sugard.testing import FakeSugar

SQUATTER = NOBODY - 1  # another local user, neither the client nor root

# A stand-in for sugard run by the squatter: answers every request with its own "token" and
# writes down what it was sent.
FAKE_SUGARD = """
import os, socket, sys
path, seen = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen()
body = b'{"access_token": "squatter-token", "url": "http://squatter.example"}'
while True:
    conn, _ = server.accept()
    with conn, open(seen, "ab") as log:
        try:
            log.write(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
        except OSError:
            pass
"""


def _run(script: str, keep: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_private_tmp(script, keep), capture_output=True, text=True, timeout=90, check=False
    )


def test_sugarctl_finds_a_daemon_on_the_fallback_socket(fake: FakeSugar, short_dir: Path) -> None:
    """A daemon started without $XDG_RUNTIME_DIR listens on /tmp/sugard-UID/sugard.sock; a
    shell with $XDG_RUNTIME_DIR set still reaches it for `token`, `status` and `env`, and env
    prints that socket."""
    config = write_config(short_dir, {"prod": instance(fake)})
    uid = os.getuid()
    fallback = f"/tmp/sugard-{uid}/sugard.sock"
    runtime = short_dir / "runtime"
    runtime.mkdir(mode=0o700)
    script = f"""
export SUGARD_CONFIG={config} SUGARD_SOCKET=
env -u XDG_RUNTIME_DIR {SUGARD} run > {short_dir}/sugard.log 2>&1 &
for i in $(seq 300); do [ -S {fallback} ] && break; sleep 0.1; done
export XDG_RUNTIME_DIR={runtime}
echo "token: $({SUGARCTL} token prod --wait 20)"
echo "names: $({SUGARCTL} status --names)"
echo "env: $({SUGARCTL} env --shell sh)"
{SUGARCTL} shutdown >/dev/null
wait
"""
    result = _run(script, [short_dir])
    assert 0 == result.returncode, result.stderr + (short_dir / "sugard.log").read_text()
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert fake.valid(lines["token"])
    assert "prod" == lines["names"]
    assert f"SUGARD_SOCKET={fallback}; export SUGARD_SOCKET;" == lines["env"]
    assert "" == result.stderr


def test_a_squatted_default_socket_is_refused_naming_the_uid(
    short_dir: Path, foreign_sugarctl: str
) -> None:
    """Another user who creates /tmp/sugard-UID first (or answers in a folder of the client's
    that others may write) gets nothing: token, invalidate, exec, env and SugardClient refuse
    with exit 7 naming that uid, and the squatter is sent no byte and no token."""
    short_dir.chmod(0o755)
    server = short_dir / "fake_sugard.py"
    server.write_text(FAKE_SUGARD)
    seen = short_dir / "seen"
    seen.touch()
    seen.chmod(0o666)
    squatted = f"/tmp/sugard-{NOBODY}"
    as_client = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups"
    squatter = f"setpriv --reuid={SQUATTER} --regid={SQUATTER} --clear-groups"
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    client_lib = Path(foreign_sugarctl).parent
    sdk = (
        f"import sys; sys.path.insert(0, {str(client_lib)!r}); "
        "from sugard.client import SugardClient, SugardError\n"
        "try:\n    SugardClient().token('prod')\n"
        "except SugardError as exc:\n    print(exc.exit_code, exc.message)"
    )
    cases = {
        "token": f"{foreign_sugarctl} token prod",
        "invalidate": f"{foreign_sugarctl} invalidate prod",
        "exec": f"{foreign_sugarctl} exec prod -- sh -c 'echo ran with $SUGAR_TOKEN'",
        "env": f"{foreign_sugarctl} env",
        "sdk": f"{python} -I -c {shlex.quote(sdk)}",
    }
    lines = ["set +e", "unset XDG_RUNTIME_DIR SUGARD_SOCKET SUGARD_CONFIG"]
    for setup in (
        # the squatter owns the fallback folder
        f"{squatter} {python} -I {server} {squatted}/sugard.sock {seen} >/dev/null 2>&1 &",
        # the folder is the client's, but open to all: the squatter answers inside it
        f"mkdir -m 1777 {squatted} && chown {NOBODY} {squatted} && "
        f"{squatter} {python} -I {server} {squatted}/sugard.sock {seen} >/dev/null 2>&1 &",
    ):
        lines += [
            "rm -rf /tmp/sugard-*",
            setup,
            "squatter=$!",
            f"for i in $(seq 300); do [ -S {squatted}/sugard.sock ] && break; sleep 0.1; done",
        ]
        for name, command in cases.items():
            lines.append(f"said=$(echo owners-real-token | {as_client} {command} 2>&1)")
            lines.append(f'echo "{name}: $said (exit $?)" | tr -d "\\n"; echo')
        lines.append('kill "$squatter"; wait')
    result = _run("\n".join(lines), [short_dir, client_lib])
    assert 0 == result.returncode, result.stderr
    outcomes = result.stdout.splitlines()
    assert 2 * len(cases) == len(outcomes), result.stdout
    for outcome in outcomes:
        name, said = outcome.split(": ", 1)
        expected_exit = "(exit 0)" if name == "sdk" else "(exit 7)"
        assert said.endswith(expected_exit), outcome
        assert f"uid {SQUATTER}" in said, outcome
        assert "not your sugard" in said, outcome
        assert "squatter" not in said and "ran with" not in said, outcome
    assert b"" == seen.read_bytes()  # not even a request line reached the squatter
