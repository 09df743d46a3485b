"""sugarctl through the real console script and a real `sugard run`: every command, every exit
code, scriptable output, and the lean start-up (what it imports)."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUGARCTL, SUGARD, TOKEN_KEYS, USER, instance, sugarctl, write_config

import sugard
from sugard import __version__
from sugard.client import SugardClient, TokenUnavailable
from sugard.config import INSTANCE_KEYS_HELP
from sugard.testing import FakeSugar

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def run(*argv: str, env: dict[str, str] | None = None, input: str | None = None, **kw):
    """The real sugarctl with exactly `argv` (no --socket added)."""
    return subprocess.run(
        [SUGARCTL, *argv],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
        **kw,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the failure shape every error has: nothing on stdout, one line on stderr."""
    assert "" == result.stdout
    lines = result.stderr.splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("sugarctl: ")
    return lines[0]


# token, header, exec


def test_token_formats(fake: FakeSugar, daemon) -> None:
    """`token` prints the bare token, the header line, the TOKEN JSON, or eval-able exports."""
    bare = sugarctl(daemon.socket, "token", "prod")
    assert 0 == bare.returncode, bare.stderr
    token = bare.stdout.strip()
    assert bare.stdout == token + "\n"
    assert fake.valid(token)
    assert (
        f"OAuth-Token: {token}\n"
        == sugarctl(daemon.socket, "token", "prod", "--format", "header").stdout
    )
    body = json.loads(sugarctl(daemon.socket, "token", "prod", "--format=json").stdout)
    assert TOKEN_KEYS == set(body)
    assert (token, fake.url) == (body["access_token"], body["url"])
    shell = subprocess.run(
        [
            "sh",
            "-c",
            f'eval "$("{SUGARCTL}" --socket "{daemon.socket}" token prod --format env)"'
            ' && printf "%s\\n%s\\n%s\\n" "$SUGAR_URL" "$SUGAR_TOKEN" "$SUGAR_DOWNLOAD_TOKEN"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert [fake.url, token, body["download_token"]] == shell.stdout.splitlines()


def test_header_works_with_curl_against_sugar(fake: FakeSugar, daemon) -> None:
    """`curl -H "$(sugarctl header prod)"` is accepted by Sugar's /me."""
    header = sugarctl(daemon.socket, "header", "prod")
    assert 0 == header.returncode, header.stderr
    assert header.stdout.startswith("OAuth-Token: ")
    me = subprocess.run(
        ["curl", "-sS", "--fail", "-H", header.stdout.strip(), f"{fake.url}/rest/v10/me"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert USER == json.loads(me.stdout)["current_user"]["user_name"]


def test_min_ttl_renews_a_token_that_would_expire_too_soon(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`--min-ttl` longer than the token has left makes sugard refresh before answering."""
    fake.access_lifetime = 10
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    first = sugarctl(daemon.socket, "token", "prod", "--wait", "20").stdout.strip()
    assert sugarctl(daemon.socket, "token", "prod", "--min-ttl", "5").stdout.strip() == first
    time.sleep(1.2)  # now under 9 s left: 9 s (the cap, 90% of 10) cannot be met
    result = sugarctl(daemon.socket, "token", "prod", "--min-ttl", "9")
    assert 0 == result.returncode, result.stderr
    renewed = result.stdout.strip()
    assert renewed != first
    assert fake.valid(renewed)
    assert 1 == fake.calls["refresh_token"]


def test_exec_passes_the_token_to_a_real_child_and_returns_its_status(
    fake: FakeSugar, daemon
) -> None:
    """`exec NAME -- CMD` runs CMD with SUGAR_URL/TOKEN/DOWNLOAD_TOKEN; its status is ours."""
    child = (
        "import json, os, sys; "
        "print(json.dumps({k: os.environ[k] for k in "
        "('SUGAR_URL', 'SUGAR_TOKEN', 'SUGAR_DOWNLOAD_TOKEN')})); "
        "print(json.dumps(sys.argv[1:])); sys.exit(17)"
    )
    result = sugarctl(
        daemon.socket,
        "exec",
        "prod",
        "--wait",
        "5",
        "--",
        sys.executable,
        "-c",
        child,
        "--wait",
        "-x",
        "--",
        "token",
    )
    assert 17 == result.returncode, result.stderr
    env_line, argv_line = result.stdout.splitlines()
    env = json.loads(env_line)
    assert fake.url == env["SUGAR_URL"]
    assert fake.valid(env["SUGAR_TOKEN"])
    assert env["SUGAR_DOWNLOAD_TOKEN"]
    assert ["--wait", "-x", "--", "token"] == json.loads(argv_line)
    # Without `--`, the first word after NAME starts CMD.
    plain = sugarctl(daemon.socket, "exec", "prod", "sh", "-c", 'test -n "$SUGAR_TOKEN"')
    assert 0 == plain.returncode, plain.stderr


def test_exec_of_a_missing_or_unrunnable_command(daemon, short_dir: Path) -> None:
    """exec exits 127 for a command not found and 126 for a file that cannot be run."""
    missing = sugarctl(daemon.socket, "exec", "prod", "--", "no-such-command-here")
    assert 127 == missing.returncode
    assert "no-such-command-here: command not found" in one_error_line(missing)
    not_executable = short_dir / "data.txt"
    not_executable.write_text("hello\n")
    refused = sugarctl(daemon.socket, "exec", "prod", "--", str(not_executable))
    assert 126 == refused.returncode
    assert "cannot run" in one_error_line(refused)


# status, invalidate, refresh, reload, ping


def test_status_table_on_a_terminal_and_json(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`status` prints a table (on a terminal too) with the failing instance's last error;
    `--json` prints the STATUS list, or one object for a NAME."""
    config = write_config(
        short_dir,
        {"prod": instance(fake), "broken": instance(fake, username="admin", password="wrong")},
    )
    daemon = start_daemon(config)
    assert 0 == sugarctl(daemon.socket, "token", "prod", "--wait", "20").returncode
    assert 6 == sugarctl(daemon.socket, "token", "broken", "--wait", "20").returncode
    main, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [SUGARCTL, "--socket", str(daemon.socket), "status"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
        os.close(secondary)
        output = b""
        while chunk := _read_pty(main):
            output += chunk
    finally:
        os.close(main)
    assert 0 == proc.returncode, proc.stderr
    lines = output.decode().replace("\r\n", "\n").splitlines()
    assert ["NAME", "STATE", "EXPIRES", "IN", "LAST", "REFRESH", "LAST", "ERROR"] == lines[
        0
    ].split()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {"broken", "prod"} == set(rows)
    _, state, expires_in, ago, ago_word, last_error = rows["prod"]
    assert ("ready", "ago", "-") == (state, ago_word, last_error)
    assert expires_in.startswith("59m")
    assert ago.endswith("s")
    assert [
        "broken",
        "failed",
        "-",
        "never",
        "credentials:",
        "Sugar",
        "rejected",
        "the",
        "credentials",
    ] == rows["broken"][:9]
    listed = json.loads(sugarctl(daemon.socket, "status", "--json").stdout)
    assert ["broken", "prod"] == [s["name"] for s in listed]
    one = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert ("prod", "ready", USER) == (one["name"], one["state"], one["username"])
    table = sugarctl(daemon.socket, "status", "prod").stdout.splitlines()
    assert 2 == len(table)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end is closed and everything was read
        return b""


def test_invalidate_renews_once_from_argument_or_stdin(fake: FakeSugar, daemon) -> None:
    """Reporting the current token, dead, prints a new one (one refresh); reporting it again, from
    stdin, prints the current token without another upstream call."""
    old = sugarctl(daemon.socket, "token", "prod").stdout.strip()
    assert fake.revoke(old)  # Sugar refused it: sugard checks a report before renewing
    fake.reset_counters()
    result = sugarctl(daemon.socket, "invalidate", "prod", old)
    assert 0 == result.returncode, result.stderr
    new = result.stdout.strip()
    assert new != old
    assert fake.valid(new)
    again = sugarctl(daemon.socket, "invalidate", "prod", input=old + "\n")
    assert new + "\n" == again.stdout
    dash = sugarctl(daemon.socket, "invalidate", "prod", "-", input=old + "\n")
    assert new + "\n" == dash.stdout
    assert 1 == fake.calls["token"]
    empty = sugarctl(daemon.socket, "invalidate", "prod", input="\n")
    assert 2 == empty.returncode
    assert "no token" in one_error_line(empty)


def test_refresh_prints_a_new_token(fake: FakeSugar, daemon) -> None:
    """`refresh NAME` makes sugard renew now and prints the new, valid token."""
    old = sugarctl(daemon.socket, "token", "prod").stdout.strip()
    result = sugarctl(daemon.socket, "refresh", "prod")
    assert 0 == result.returncode, result.stderr
    new = result.stdout.strip()
    assert new != old
    assert fake.valid(new)
    assert 1 == fake.calls["refresh_token"]


def test_reload_prints_the_changes_or_each_problem_on_its_own_line(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`reload` prints what changed; a broken config exits 6 with one `sugarctl:` line, then
    each problem on a line of its own exactly as `sugard check` prints it (file, table, key),
    and the old config keeps serving the same tokens."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    same = sugarctl(daemon.socket, "reload")
    assert (0, "no changes (1 unchanged)\n") == (same.returncode, same.stdout)
    write_config(
        short_dir,
        {"prod": instance(fake), "staging": instance(fake, username="admin", password="admin-pw")},
    )
    added = sugarctl(daemon.socket, "reload")
    assert (0, "added: staging (1 unchanged)\n") == (added.returncode, added.stdout)
    before = sugarctl(daemon.socket, "token", "staging", "--wait", "20").stdout
    config.write_text(config.read_text() + '\n[instances.bad]\nurl = "ftp://x"\ncolour = "red"\n')

    broken = sugarctl(daemon.socket, "reload")
    check = subprocess.run(
        [SUGARD, "check", "--unit", "none", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert (6, "") == (broken.returncode, broken.stdout)
    first, *problems = broken.stderr.splitlines()
    assert "sugarctl: the new config has errors; the old one is still running:" == first
    assert [
        f"{config}: instances.bad.url: must start with https:// (or http://), not 'ftp://x'",
        f"{config}: instances.bad.colour: unknown key; {INSTANCE_KEYS_HELP}",
        f"{config}: instances.bad.username: missing; every instance needs url and username",
        f"{config}: instances.bad.password_file: missing; give the password as one of "
        "password_file, password_env, password_command, password_credential or password",
    ] == problems
    assert check.stderr.splitlines() == problems
    after = sugarctl(daemon.socket, "token", "staging")
    assert (0, before) == (after.returncode, after.stdout)
    assert "prod, staging" in sugarctl(daemon.socket, "token", "bad").stderr


def test_ping(daemon) -> None:
    """`ping` prints ok and the daemon's version."""
    result = sugarctl(daemon.socket, "ping")
    assert (0, f"ok sugard {__version__} (1 instance)\n") == (result.returncode, result.stdout)


# Exit codes


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "missing COMMAND"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["token"], "token needs NAME"),
        (["token", "prod", "extra"], "extra argument 'extra'"),
        (["token", "prod", "--wait", "-1"], "--wait must be a number of seconds"),
        (["token", "prod", "--min-ttl=soon"], "--min-ttl must be a number of seconds"),
        (["token", "prod", "--wait"], "--wait needs a value"),
        (["token", "prod", "--format", "xml"], "--format must be one of"),
        (["token", "prod", "--verbose"], "unknown option '--verbose'"),
        (["status", "--wait", "3"], "status does not take --wait"),
        (["status", "--json=yes"], "--json takes no value"),
        (["exec", "prod"], "exec needs a command"),
        (["exec", "prod", "--"], "exec needs a command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(short_dir: Path, argv: list[str], says: str) -> None:
    """Bad command lines exit 2 with one line that names the problem, before any connection."""
    result = run("--socket", str(short_dir / "none.sock"), *argv)
    assert 2 == result.returncode
    line = one_error_line(result)
    assert says in line
    assert "sugarctl --help" in line


def test_a_wait_the_daemon_refuses_exits_2(daemon) -> None:
    """The daemon's 400 (a wait over 300 s) is a usage error too, with the daemon's reason."""
    result = sugarctl(daemon.socket, "token", "prod", "--wait", "301")
    assert 2 == result.returncode
    assert "wait" in one_error_line(result)


def test_unknown_instance_exits_3_listing_the_configured_ones(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Every command about an unknown instance exits 3 and names the configured instances."""
    config = write_config(
        short_dir,
        {"prod": instance(fake), "staging": instance(fake, username="admin", password="admin-pw")},
    )
    daemon = start_daemon(config)
    for argv in (
        ["token", "prdo"],
        ["header", "prdo"],
        ["exec", "prdo", "--", "true"],
        ["status", "prdo"],
        ["invalidate", "prdo", "x"],
        ["refresh", "prdo"],
    ):
        result = sugarctl(daemon.socket, *argv)
        assert 3 == result.returncode, argv
        assert "configured: prod, staging" in one_error_line(result)


def test_no_daemon_exits_4_saying_how_to_start_it(short_dir: Path) -> None:
    """No socket, or a socket nobody listens on, exits 4 with how to start sugard."""
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
        for path, why in ((short_dir / "none.sock", "No such file"), (stale, "refused")):
            result = sugarctl(path, "token", "prod")
            assert 4 == result.returncode
            line = one_error_line(result)
            assert why in line
            assert "systemctl --user start sugard" in line
            assert "sugard run" in line


def test_token_unavailable_exits_5_while_sugar_is_down(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """While Sugar answers 503, a token request exits 5 after --wait, saying when to retry."""
    fake.fail_next(1000, "503")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    started = time.monotonic()
    result = sugarctl(daemon.socket, "token", "prod", "--wait", "0.3")
    assert 5 == result.returncode
    line = one_error_line(result)
    assert "no valid token for 'prod'" in line
    assert "try again in" in line
    assert time.monotonic() - started < 10


def test_token_unavailable_exits_5_while_still_logging_in(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A login slower than --wait exits 5 (logging_in); a longer wait then gets the token."""
    fake.delay = 1.5
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    early = sugarctl(daemon.socket, "token", "prod", "--wait", "0.2")
    assert 5 == early.returncode
    assert "logging_in" in one_error_line(early)
    late = sugarctl(daemon.socket, "token", "prod", "--wait", "20")
    assert 0 == late.returncode, late.stderr
    assert fake.valid(late.stdout.strip())


def test_a_daemon_at_its_connection_limit_exits_5_for_every_command(
    fake: FakeSugar, short_dir: Path
) -> None:
    """A daemon holding its maximum of connections answers `busy`: sugarctl exits 5 (the
    client raises TokenUnavailable with retry_after 1) with one line, for token and for
    ping alike; once the connections go, the token flows again."""
    config = write_config(short_dir, {"prod": instance(fake)})
    sock = short_dir / "s.sock"
    # An open files limit of 64 makes the daemon hold at most 32 connections.
    argv = ["prlimit", "--nofile=64:64", SUGARD, "run", "-c", str(config), "--socket", str(sock)]
    with (short_dir / "sugard.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while sugarctl(sock, "token", "prod").returncode != 0:
            assert time.monotonic() < deadline, (short_dir / "sugard.log").read_text()
            time.sleep(0.05)
        while True:
            while len(held) < 32:
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(os.fspath(sock))
                held.append(conn)
            time.sleep(0.2)
            # Turned away (readable: the `busy` answer) while a closing connection of the
            # readiness check still counted: replace those, until the daemon holds all 32.
            turned_away, _, _ = select.select(held, [], [], 0)
            if not turned_away:
                break
            for conn in turned_away:
                conn.close()
                held.remove(conn)
        # The daemon accepts in arrival order: sugarctl's connection comes after all of ours.
        for args in (["token", "prod"], ["ping"]):
            busy = sugarctl(sock, *args)
            assert 5 == busy.returncode, (args, busy.stderr)
            assert (
                "sugarctl: sugard is serving its maximum of 32 connections; try again in a moment"
                == one_error_line(busy)
            )
        with SugardClient(sock) as client, pytest.raises(TokenUnavailable) as caught:
            client.token("prod")
        assert (5, 1.0, "busy") == (
            caught.value.exit_code,
            caught.value.retry_after,
            caught.value.body["error"],
        )
        for conn in held:
            conn.close()
        assert 0 == sugarctl(sock, "token", "prod").returncode
    finally:
        for conn in held:
            conn.close()
        proc.terminate()
        proc.wait(15)


def test_wrong_password_exits_6_and_exec_runs_nothing(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A rejected password exits 6 for token, header and exec; exec never starts CMD."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, password="nope")}))
    marker = short_dir / "ran"
    for argv in (
        ["token", "prod", "--wait", "20"],
        ["header", "prod"],
        ["exec", "prod", "--", "touch", str(marker)],
    ):
        result = sugarctl(daemon.socket, *argv)
        assert 6 == result.returncode, argv
        assert "credentials" in one_error_line(result)
    assert not marker.exists()
    assert 1 == fake.calls["password"]


def test_permission_denied_exits_7(fake: FakeSugar, daemon, foreign_sugarctl: str) -> None:
    """Another uid exits 7: when the socket refuses it (EACCES) and when the daemon does (403)."""
    daemon.socket.parent.chmod(0o755)  # the socket itself stays 0600
    argv = [*AS_NOBODY, foreign_sugarctl, "--socket", str(daemon.socket), "token", "prod"]
    denied = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert 7 == denied.returncode, denied.stderr
    assert "no permission to connect" in one_error_line(denied)
    daemon.socket.chmod(0o666)  # now only the daemon's credential check stands in the way
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert 7 == refused.returncode, refused.stderr
    assert f"uid {NOBODY} may not use this sugard" in one_error_line(refused)


# The socket, help, and what sugarctl imports


def test_socket_from_option_environment_or_config(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """--socket (anywhere) beats $SUGARD_SOCKET, which beats [daemon].socket of $SUGARD_CONFIG;
    with none of them, $XDG_RUNTIME_DIR/sugard/sugard.sock."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    sock = str(daemon.socket)
    nowhere = str(short_dir / "nowhere.sock")
    other = write_config(short_dir, {}, daemon={"socket": sock}, name="other.toml")
    isolated = {
        "SUGARD_SOCKET": "",
        "SUGARD_CONFIG": str(short_dir / "none.toml"),
        "XDG_RUNTIME_DIR": str(short_dir / "runtime"),
    }
    cases = [
        (["token", "prod", "--socket", sock], {**isolated, "SUGARD_SOCKET": nowhere}, 0),
        (["--socket", nowhere, "token", "prod"], {**isolated, "SUGARD_SOCKET": sock}, 4),
        (["token", "prod"], {**isolated, "SUGARD_SOCKET": sock}, 0),
        (["token", "prod"], {**isolated, "SUGARD_CONFIG": str(other)}, 0),
        (["token", "prod"], isolated, 4),
    ]
    for argv, env, code in cases:
        assert code == run(*argv, env=env).returncode, (argv, env)
    (short_dir / "runtime" / "sugard").mkdir(parents=True)
    (short_dir / "runtime" / "sugard" / "sugard.sock").symlink_to(sock)
    assert 0 == run("token", "prod", env=isolated).returncode


def test_help_and_version() -> None:
    """--help lists every command and exit code; --version prints the version."""
    help_text = run("--help")
    assert 0 == help_text.returncode
    for word in (
        "token",
        "header",
        "exec",
        "status",
        "invalidate",
        "refresh",
        "reload",
        "ping",
        "--socket",
        "--min-ttl",
        "--wait",
        "--format",
        "SUGARD_SOCKET",
    ):
        assert word in help_text.stdout
    for code in range(8):
        assert f"\n  {code}  " in help_text.stdout
    assert help_text.stdout == run("token", "--help").stdout
    assert f"sugarctl {__version__}\n" == run("--version").stdout


_MODULES = """\
import sys
from sugard.ctl import main
code = main(sys.argv[1:])
print(" ".join(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def modules_after(python_flags: list[str], socket_path: Path, *argv: str) -> set[str]:
    """sys.modules after a real sugarctl run of `argv` in a fresh interpreter."""
    root = str(Path(sugard.__file__).parent.parent)
    result = subprocess.run(
        [
            sys.executable,
            *python_flags,
            "-c",
            f"import sys; sys.path.insert(0, {root!r})\n" + _MODULES,
            "--socket",
            str(socket_path),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    return set(result.stderr.split())


def test_sugarctl_never_imports_aiohttp_asyncio_tenacity_or_the_daemon(daemon) -> None:
    """After real runs of each command, sys.modules holds none of the daemon's world."""
    for argv in (
        ["token", "prod", "--format", "json"],
        ["status"],
        ["ping"],
        ["exec", "prod", "--", "true"],
        ["refresh", "prod"],
        ["reload"],
    ):
        if argv[0] == "exec":  # exec replaces the process: check what it had loaded before
            argv = ["token", "prod", "--format", "env"]
        loaded = modules_after([], daemon.socket, *argv)
        ours = {m for m in loaded if m == "sugard" or m.startswith("sugard.")}
        assert {"sugard", "sugard.client", "sugard.ctl"} == ours, argv
        for heavy in ("aiohttp", "asyncio", "tenacity", "tomli_w", "multidict", "yarl"):
            assert heavy not in loaded, (argv, heavy)


def test_sugarctl_token_imports_only_cheap_modules(daemon) -> None:
    """`sugarctl token` loads only os (which site loads anyway) and C modules: no re, enum,
    json, socket, argparse, typing or pathlib, each of which costs about a bare interpreter
    start. Run without site, so that site's own imports do not hide ours."""
    cheap = {
        "os",
        "os.path",
        "posixpath",
        "genericpath",
        "stat",
        "_stat",
        "_collections_abc",
        "__future__",
        "_json",
        "_socket",
        "sugard",
        "sugard.client",
        "sugard.ctl",
    }
    bare = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    loaded = modules_after(["-I", "-S"], daemon.socket, "token", "prod")
    assert set() == loaded - set(bare) - cheap
