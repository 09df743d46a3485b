"""sugarctl through the real console script and a real `sugard run`: every command, every exit
code, scriptable output, and the lean start-up (what it imports)."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT
from support.daemon import SUGARCTL, SUGARD, TOKEN_KEYS, USER, instance, sugarctl, write_config
from support.nobody import AS_NOBODY, NOBODY

import sugard
from sugard import __version__
from sugard.client import BadRequest, SugardClient, TokenUnavailable
from sugard.client.ctl import COMMANDS
from sugard.config import INSTANCE_KEYS_HELP
from sugard.secret import fingerprint
from sugard.testing import FakeSugar


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def on_a_terminal(
    argv: list[str], env: dict[str, str] | None = None, *, stderr_too: bool = False
) -> tuple[int, str, str]:
    """Run `argv` with stdout (and stderr, if asked) on a pty: (status, pty text, stderr)."""
    main, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv,
            stdout=secondary,
            stderr=secondary if stderr_too else subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        os.close(secondary)
        output = b""
        while chunk := _read_pty(main):
            output += chunk
        stderr = ""
        if proc.stderr is not None:
            with proc.stderr:
                stderr = proc.stderr.read().decode()
        proc.wait(30)
    finally:
        os.close(main)
    return proc.returncode, output.decode().replace("\r\n", "\n"), stderr


@pytest.mark.slow
def test_status_table_fits_80_columns_with_short_errors_and_colour_on_a_terminal_only(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`status` prints NAME, STATE, EXPIRES IN, NEXT REFRESH, LAST REFRESH and the last error
    as its kind and age, within 80 columns however long Sugar's message; coloured on a
    terminal, never with NO_COLOR or into a pipe; the full text is in `status NAME` and
    `--json`."""
    config = write_config(
        short_dir,
        {"prod": instance(fake), "broken": instance(fake, username="admin", password="wrong")},
    )
    daemon = start_daemon(config)
    assert 0 == sugarctl(daemon.socket, "token", "prod", "--wait", "20").returncode
    assert 6 == sugarctl(daemon.socket, "token", "broken", "--wait", "20").returncode
    argv = [SUGARCTL, "--socket", str(daemon.socket), "status"]

    code, coloured, _ = on_a_terminal(argv, {"NO_COLOR": ""})
    _, plain_on_tty, _ = on_a_terminal(argv, {"NO_COLOR": "1"})
    piped = run(*argv[1:], env={"NO_COLOR": ""})

    assert 0 == code
    assert "\x1b[" in coloured
    assert "\x1b[" not in plain_on_tty
    assert "\x1b[" not in piped.stdout
    lines = ANSI.sub("", coloured).splitlines()
    assert [
        ["NAME", "STATE", "EXPIRES", "IN", "NEXT", "REFRESH", "LAST", "REFRESH", "LAST", "ERROR"]
    ] == [lines[0].split()]
    assert all(len(line) <= 80 for line in lines + piped.stdout.splitlines()), lines
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {"broken", "prod"} == set(rows)
    _, state, expires_in, next_refresh, ago, ago_word, last_error = rows["prod"]
    assert ("ready", "ago", "-") == (state, ago_word, last_error)
    assert re.fullmatch(r"[0-9]+s", ago)
    assert expires_in.startswith("59m")
    assert next_refresh.startswith("5")  # refresh_before 300 s, with jitter: ~55 min
    assert ["broken", "failed", "-", "-", "never", "credentials,"] == rows["broken"][:6]
    assert re.fullmatch(r"[0-9]+s", rows["broken"][6])
    assert "ago" == rows["broken"][7]
    assert 8 == len(rows["broken"])  # the message is for `status broken`

    listed = json.loads(sugarctl(daemon.socket, "status", "--json").stdout)
    assert ["broken", "prod"] == [s["name"] for s in listed]
    message = listed[0]["last_error"]["message"]
    assert "Sugar rejected the credentials" in message
    one = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert ("prod", "ready", USER) == (one["name"], one["state"], one["username"])
    detail = sugarctl(daemon.socket, "status", "broken").stdout
    assert detail.startswith("broken: failed\n")
    assert " ".join(message.split()) in detail
    assert re.search(r"last error +credentials, [0-9]+s ago \(.*Z\), now\n", detail)


def test_a_past_error_is_shown_with_its_age_never_as_the_current_state(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """After a failure the instance recovered from, status keeps the error as past: the
    table says `was KIND, AGE ago` in the LAST ERROR column (dim on a terminal, not red), and
    `status NAME` says it recovered since."""
    fake.fail_next(1, "503")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    assert 0 == sugarctl(daemon.socket, "token", "prod", "--wait", "20").returncode
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert ("ready", "server_error") == (status["state"], status["last_error"]["kind"])

    table = sugarctl(daemon.socket, "status").stdout.splitlines()
    _, coloured, _ = on_a_terminal(
        [SUGARCTL, "--socket", str(daemon.socket), "status"], {"NO_COLOR": ""}
    )
    detail = sugarctl(daemon.socket, "status", "prod").stdout

    assert re.search(r"  was server_error, [0-9]+s ago$", table[1]), table
    assert "\x1b[2mwas server_error" in coloured  # dim: past
    assert "\x1b[31m" not in coloured  # nothing red: nothing is wrong now
    assert re.search(r"last error +server_error, [0-9]+s ago \(.*Z\), past: it recovered", detail)


def test_a_failed_instance_whose_session_was_evicted_shows_no_expiry(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Evicted, then failed on a password Sugar rejects: the dead token expires nowhere, so
    the table shows EXPIRES IN `-` and `--json` an expires_at of null, not the dead token's."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    evicted = sugarctl(daemon.socket, "token", "prod", "--wait", "20").stdout.strip()
    fake.set_password(USER, "changed-at-sugar")
    assert 1 == fake.evict(USER, "sugard")
    assert 6 == sugarctl(daemon.socket, "invalidate", "prod", input=evicted + "\n").returncode
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert ("failed", None) == (status["state"], status["expires_at"])
    [row] = sugarctl(daemon.socket, "status").stdout.splitlines()[1:]
    assert ["prod", "failed", "-"] == row.split()[:3]


@pytest.mark.slow
def test_status_wait_shows_it_is_waiting_on_a_terminal(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`status --wait S` waits while an instance logs in, saying so on a terminal's stderr
    (and nothing on a pipe's), then prints the table once it is ready; a wait that runs out
    exits 5 naming --wait."""
    fake.delay = 2.0
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    argv = [SUGARCTL, "--socket", str(daemon.socket), "status", "--wait", "30"]

    short = sugarctl(daemon.socket, "status", "--wait", "0.2")
    code, screen, _ = on_a_terminal(argv, stderr_too=True)

    assert 5 == short.returncode
    assert short.stdout.startswith("NAME")  # the table still comes
    assert "sugarctl: still starting or logging in after --wait 0.2 s: prod\n" == short.stderr
    assert 0 == code
    assert "sugarctl: waiting for prod (logging_in)" in screen
    assert "of --wait 30" in screen
    table = screen.rpartition("\x1b[K")[2]  # the waiting line is cleared before the table
    assert " ready " in ANSI.sub("", table)
    quiet = sugarctl(daemon.socket, "status", "--wait", "30")
    assert (0, "") == (quiet.returncode, quiet.stderr)


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


@pytest.mark.slow
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


def test_ping_prints_what_the_readme_shows(daemon) -> None:
    """`ping` prints ok, the daemon's version and `(1 instance)`, as README shows it."""
    result = sugarctl(daemon.socket, "ping")
    assert (0, f"ok sugard {__version__} (1 instance)\n") == (result.returncode, result.stdout)
    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"sugarctl ping +# (ok sugard \S+ \(.*?\))", readme)
    assert shown, "README shows what ping prints"
    for line in shown:
        assert result.stdout.strip() == line.replace(line.split()[2], __version__)


# Exit codes


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "missing COMMAND"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["token"], "token needs NAME"),
        (["token", "prod", "extra"], "extra argument 'extra'"),
        (["token", "prod", "--wait", "-1"], "--wait must be a number of seconds from 0 to 300"),
        (["token", "prod", "--wait", "301"], "--wait must be a number of seconds from 0 to 300"),
        (["token", "prod", "--min-ttl=soon"], "--min-ttl must be a number of seconds"),
        (["token", "prod", "--min-ttl=86401"], "--min-ttl must be a number of seconds from 0"),
        (["token", "prod", "--fingerprint", "--format", "json"], "leave out --format"),
        (["status", "--names", "--json"], "--names prints only the names"),
        (["env", "--shell", "tcsh"], "--shell must be one of sh, bash, zsh, fish"),
        (["completion"], "completion needs SHELL"),
        (["completion", "powershell"], "SHELL must be one of bash, zsh, fish"),
        (["help", "frobnicate"], "COMMAND must be one of token, header"),
        (["token", "prod", "--wait"], "--wait needs a value"),
        (["token", "prod", "--format", "xml"], "--format must be one of"),
        (["token", "prod", "--verbose"], "unknown option '--verbose'"),
        (["ping", "--wait", "3"], "ping does not take --wait"),
        (["reload", "--retry-rejected"], "reload does not take --retry-rejected"),
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
    command = next((word for word in argv if not word.startswith("-")), None)
    pointer = f"(see: sugarctl help {command})" if command in COMMANDS else "(see: sugarctl --help)"
    assert line.endswith(pointer)


def test_a_wait_the_daemon_refuses_exits_2(daemon) -> None:
    """The daemon's 400 (a wait over 300 s) is a usage error too, with the daemon's reason:
    what the client library says in the API's words, sugarctl says in its flags' (above)."""
    with daemon.client() as client, pytest.raises(BadRequest) as caught:
        client.token("prod", wait=301)
    assert "wait must be between 0 and 300 seconds" in caught.value.message
    raw = subprocess.run(
        [
            "curl",
            "-sS",
            "--unix-socket",
            str(daemon.socket),
            "http://sugard/v1/instances/prod/token?wait=301",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "bad_request" == json.loads(raw.stdout)["error"]


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_version() -> None:
    """--version prints sugarctl's version (help is tests/test_help.py's)."""
    assert f"sugarctl {__version__}\n" == run("--version").stdout


_MODULES = """\
import sys
from sugard.client.ctl import main
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


@pytest.mark.slow
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
        status_table = {"sugard.client.status"} if argv[0] == "status" else set()
        sugarctl = {
            "sugard",
            "sugard.client",
            "sugard.client.transport",
            "sugard.client.ctl",
            "sugard.wire",
        }
        assert sugarctl | status_table == ours, argv
        for heavy in ("aiohttp", "asyncio", "tenacity", "tomli_w", "multidict", "yarl"):
            assert heavy not in loaded, (argv, heavy)


@pytest.mark.slow
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
        "sugard.client.transport",
        "sugard.client.ctl",
        "sugard.wire",
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


# --min-ttl, --wait and fingerprints in the flags' own words


@pytest.mark.slow
def test_a_min_ttl_longer_than_tokens_live_is_said_on_stderr(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`--min-ttl` beyond the lifetime Sugar gives tokens still prints the token (the best
    there is), and says on stderr, naming --min-ttl and the lifetime, that it is shorter;
    a min-ttl the token meets says nothing."""
    fake.access_lifetime = 60
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    met = sugarctl(daemon.socket, "token", "prod", "--min-ttl", "10", "--wait", "20")
    assert (0, "") == (met.returncode, met.stderr)

    unmet = sugarctl(daemon.socket, "token", "prod", "--min-ttl", "7200")
    header = sugarctl(daemon.socket, "header", "prod", "--min-ttl", "7200")

    assert 0 == unmet.returncode
    assert fake.valid(unmet.stdout.strip())
    assert re.fullmatch(
        r"sugarctl: --min-ttl 7200 is more than a token of 'prod' can have: Sugar makes them "
        r"last 60 s; this one is valid [0-9]+ s more\n",
        unmet.stderr,
    )
    assert "min_ttl" not in unmet.stderr
    assert header.stdout.startswith("OAuth-Token: ")
    assert "--min-ttl 7200" in header.stderr
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            "--unix-socket",
            str(daemon.socket),
            "http://sugard/v1/instances/prod/token?min_ttl=7200",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "sugard-token-lifetime: 60\n" in curl.stdout.lower()


@pytest.mark.slow
def test_token_unavailable_names_the_wait_flag(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """No token within --wait: the message says how long it waited, as `--wait S`."""
    fake.fail_next(1000, "503")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    result = sugarctl(daemon.socket, "token", "prod", "--wait", "0.3")
    assert 5 == result.returncode
    line = one_error_line(result)
    assert "(waited --wait 0.3 s; try again in " in line
    assert "wait=" not in line


@pytest.mark.slow
def test_token_fingerprint_matches_the_log_and_status(fake: FakeSugar, daemon) -> None:
    """`token NAME --fingerprint` prints the 8 hex digits sugard's log names the token by
    (sugard.secret.fingerprint), and `status NAME` shows the same."""
    token = sugarctl(daemon.socket, "token", "prod").stdout.strip()
    result = sugarctl(daemon.socket, "token", "prod", "--fingerprint")
    assert 0 == result.returncode, result.stderr
    printed = result.stdout.strip()
    assert fingerprint(token) == printed == hashlib.sha256(token.encode()).hexdigest()[:8]
    assert f"prod: token {printed}, valid" in daemon.log()
    assert token not in result.stdout
    assert (
        f"token         {printed} (fingerprint), expires in"
        in sugarctl(daemon.socket, "status", "prod").stdout
    )
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert printed == status["token_fingerprint"]


# env


@pytest.mark.slow
def test_env_prints_the_answering_socket_for_sh_and_fish(fake: FakeSugar, short_dir: Path) -> None:
    """`env` prints the SUGARD_SOCKET line of the socket it found answering (quoted when the
    path needs it); eval'd in a shell with no XDG_RUNTIME_DIR (cron, su), sugarctl finds the
    daemon. A socket nobody answers on prints nothing and exits 4."""
    from support.daemon import DaemonProcess

    sock = short_dir / "a b" / "s.sock"
    sock.parent.mkdir(mode=0o700)
    daemon = DaemonProcess(write_config(short_dir, {"prod": instance(fake)}), sock)
    try:
        daemon.wait_ready()
        sh = sugarctl(sock, "env")
        fish_line = sugarctl(sock, "env", "--shell", "fish")
        plain = run("env", env={"SUGARD_SOCKET": str(sock.parent.parent / "x.sock")})
        cron = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SUGARD_"))}
        cron["HOME"] = str(short_dir)  # no config there either
        shell = subprocess.run(
            [
                "sh",
                "-c",
                f'eval "$({SUGARCTL} --socket "$1" env)"; exec {SUGARCTL} ping',
                "sh",
                str(sock),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=cron,
            check=False,
        )
        fish = shutil.which("fish")
        if fish:
            in_fish = subprocess.run(
                [
                    fish,
                    "--no-config",
                    "-c",
                    f"eval ({SUGARCTL} --socket '{sock}' env --shell fish); {SUGARCTL} ping",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                env=cron,
                check=False,
            )
    finally:
        daemon.stop()

    assert (0, f"SUGARD_SOCKET='{sock}'; export SUGARD_SOCKET;\n") == (sh.returncode, sh.stdout)
    assert f"set -gx SUGARD_SOCKET '{sock}';\n" == fish_line.stdout
    assert 4 == plain.returncode
    assert "x.sock" in one_error_line(plain)
    assert (0, "ok") == (shell.returncode, shell.stdout[:2]), shell.stderr
    if not fish:
        print("fish is not installed: `eval (sugarctl env --shell fish)` not run in fish")
    else:
        assert (0, "ok") == (in_fish.returncode, in_fish.stdout[:2]), in_fish.stderr


@pytest.mark.slow
def test_env_line_without_quotes_for_a_plain_path(daemon) -> None:
    """The usual socket path comes out exactly as ssh-agent prints its own variable."""
    result = sugarctl(daemon.socket, "env", "--shell", "bash")
    assert f"SUGARD_SOCKET={daemon.socket}; export SUGARD_SOCKET;\n" == result.stdout


# shutdown


@pytest.mark.slow
def test_shutdown_stops_a_daemon_started_by_hand(daemon) -> None:
    """`shutdown` makes the daemon stop as SIGTERM does: sugarctl returns once the socket is
    gone, the daemon exits 0, and its log says who asked."""
    result = sugarctl(daemon.socket, "shutdown")
    assert 0 == result.returncode, result.stderr
    assert f"sugard (pid {daemon.proc.pid}) on {daemon.socket} stopped\n" == result.stdout
    assert not daemon.socket.exists()
    assert 0 == daemon.proc.wait(15)
    assert "stopping: asked by pid" in daemon.log()
    assert "sugard stopped" in daemon.log()
    again = sugarctl(daemon.socket, "shutdown")
    assert 4 == again.returncode


@pytest.mark.slow
@pytest.mark.parametrize("systemd_env", ["INVOCATION_ID", "NOTIFY_SOCKET"])
def test_shutdown_under_systemd_says_to_use_systemctl(
    fake: FakeSugar, short_dir: Path, start_daemon, systemd_env: str
) -> None:
    """A daemon systemd started (INVOCATION_ID, or a notify socket to report to) refuses
    `shutdown` with exit 2, pointing at `systemctl --user stop sugard`, and keeps serving."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    env = {"INVOCATION_ID": "0123456789abcdef"}
    if systemd_env == "NOTIFY_SOCKET":
        env = {"NOTIFY_SOCKET": str(short_dir / "notify")}
    try:
        daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}), env=env)
        result = sugarctl(daemon.socket, "shutdown")
        assert 2 == result.returncode
        assert "systemctl --user stop sugard" in one_error_line(result)
        assert 0 == sugarctl(daemon.socket, "ping").returncode
    finally:
        notify.close()


@pytest.mark.slow
def test_shutdown_of_a_socket_activated_daemon_says_to_use_systemctl(
    fake: FakeSugar, short_dir: Path
) -> None:
    """A daemon on a socket that socket activation passed in refuses `shutdown` too: the
    socket outlives it, and the next connection would start it again."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (Debian's systemd package)")
    config = write_config(short_dir, {"prod": instance(fake)})
    path = short_dir / "act.sock"
    with (short_dir / "activate.log").open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(path), SUGARD, "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = sugarctl(path, "shutdown")
        assert 2 == result.returncode, (short_dir / "activate.log").read_text()
        assert "systemctl --user stop sugard" in one_error_line(result)
        assert 0 == sugarctl(path, "ping").returncode
    finally:
        proc.terminate()
        proc.wait(15)


def test_shutdown_works_where_systemd_variables_were_only_inherited(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A daemon started by hand from a shell that a service started (some terminals are
    services) inherits INVOCATION_ID with another pid in SYSTEMD_EXEC_PID: not systemd's."""
    env = {"INVOCATION_ID": "0123456789abcdef", "SYSTEMD_EXEC_PID": str(os.getpid())}
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}), env=env)
    result = sugarctl(daemon.socket, "shutdown")
    assert 0 == result.returncode, result.stderr
    assert 0 == daemon.proc.wait(15)


def test_the_table_takes_the_daemons_word_on_whether_an_error_is_current() -> None:
    """With `last_error.current` in STATUS, the table follows it whatever the state; without
    it, an instance that is ready or refreshing has recovered."""
    from sugard.client.status import table

    def row(state: str, **error: object) -> dict[str, object]:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 125))
        return {
            "name": "prod",
            "state": state,
            "last_error": {"at": at, "kind": "timeout", **error},
        }

    def error_cell(status: dict[str, object]) -> str:
        return table([status]).splitlines()[1].split("  ")[-1].strip()

    assert re.fullmatch(r"timeout, 2m0[5-9]s ago", error_cell(row("backing_off")))
    assert error_cell(row("ready")).startswith("was timeout, 2m")
    assert error_cell(row("backing_off", current=False)).startswith("was timeout")
    assert error_cell(row("ready", current=True)).startswith("timeout, 2m")


def test_shutdown_is_for_the_owner_only(
    fake: FakeSugar, short_dir: Path, start_daemon, foreign_sugarctl: str
) -> None:
    """A uid allowed to use the tokens (allowed_uids) may not shut the daemon down: exit 7."""
    config = write_config(short_dir, {"prod": instance(fake)}, daemon={"allowed_uids": [NOBODY]})
    daemon = start_daemon(config)
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    argv = [*AS_NOBODY, foreign_sugarctl, "--socket", str(daemon.socket)]
    ping = subprocess.run([*argv, "ping"], capture_output=True, text=True, timeout=30, check=False)
    refused = subprocess.run(
        [*argv, "shutdown"], capture_output=True, text=True, timeout=30, check=False
    )
    assert 0 == ping.returncode, ping.stderr
    assert 7 == refused.returncode
    assert f"uid {NOBODY} may not shut down sugard" in one_error_line(refused)
    assert daemon.proc.poll() is None


# refresh --retry-rejected


def test_refresh_retry_rejected_sends_the_body_and_the_daemon_takes_it(
    fake: FakeSugar, daemon, short_dir: Path
) -> None:
    """`refresh NAME --retry-rejected` sends {"retry_rejected": true} (seen by a listener
    standing in for the daemon); the real daemon accepts that body and refuses a malformed
    one with 400."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_dir / "spy.sock"))
    listener.listen(1)
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += conn.recv(65536)
            seen.append(data)
            body = json.dumps({"error": "bad_request", "message": "seen"}).encode()
            conn.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    import threading

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        spied = sugarctl(short_dir / "spy.sock", "refresh", "prod", "--retry-rejected")
    finally:
        thread.join(30)
        listener.close()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/instances/prod/refresh HTTP/1.1\r\n")
    assert {"retry_rejected": True} == json.loads(body)
    assert 2 == spied.returncode

    real = sugarctl(daemon.socket, "refresh", "prod", "--retry-rejected")
    assert 0 == real.returncode, real.stderr
    assert fake.valid(real.stdout.strip())
    bad = subprocess.run(
        [
            "curl",
            "-sS",
            "--unix-socket",
            str(daemon.socket),
            "-X",
            "POST",
            "-d",
            '{"retry_rejected": "yes"}',
            "http://sugard/v1/instances/prod/refresh",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "bad_request" == json.loads(bad.stdout)["error"]
