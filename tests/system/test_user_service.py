"""The shipped units under a real `systemd --user` manager, installed as the README says.

CI runs as root on a machine whose PID 1 is not systemd, so the test makes the world a user
manager expects, in private namespaces that vanish with it (nothing on the machine changes but a
cgroup it removes again):

- a mount and PID namespace (`unshare`) with its own `/run` (holding `/run/systemd/system`, which
  is how systemd tells it was booted with systemd), `/home`, `/var/log`, and a copy of
  `/etc/passwd` and `/etc/group` naming a throwaway user;
- a journald of its own, flushed to a persistent journal before the manager starts, so the
  user's entries land in the user's own journal file and `journalctl --user` can read them;
- a cgroup2 subtree `user.slice/user-UID.slice/user@UID.service` owned by the user (what logind
  delegates on a real machine), the path journald reads a user unit's name from;
- the user manager itself, run as the throwaway user with HOME and XDG_RUNTIME_DIR.

Then, as that user, from a copy of the checkout in their home: the README's `pipx install`
line, the README's systemd install block verbatim, and the checks: tokens, reloads (good, bad,
and a SIGHUP sent by hand), `kill -9`, stop and socket activation, and a journal without secrets.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support import ROOT
from support.daemon import PASSWORD, USER
from support.readme import README, shell_blocks

from sugard.testing import FakeSugar, running_fake

# pipx builds a wheel and a virtualenv, and the manager starts sugard several times: minutes on a
# busy machine, not the 60 s of one ordinary test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

USER_NAME = "sugardtest"
PASSWORDS = {USER: PASSWORD, "bob": "bob-secret-pw"}  # the fake's users and the config's
CHECKOUT = "sugard"  # the user's clone, in their home
DEADLINE = 60.0  # for anything the test waits on; a busy 2-core machine is slow, not stuck
TOOLS = {  # what the test runs, and the Debian package each comes with
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
    "systemctl": "systemd",
    "journalctl": "systemd",
    "pipx": "pipx",
}
MANAGER = Path("/lib/systemd/systemd")
JOURNALD = Path("/lib/systemd/systemd-journald")

# Runs as root inside `unshare --mount --pid --fork`; $1 user name, $2 uid (and gid), $3 home,
# $4 a root-only scratch directory. Prints "ready" once the manager runs, then waits for stdin
# to close and tears everything down (so a killed pytest still cleans up: its end of the pipe
# closes).
NAMESPACE_SETUP = r"""
set -eu
name=$1 uid=$2 gid=$2 home=$3 scratch=$4
wait_for_socket() {
    tries=1200  # 60 s
    until [ -S "$1" ]; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || { echo "no $1 after 60 s" >&2; exit 1; }
        sleep 0.05
    done
}
mount -t tmpfs -o mode=755 tmpfs /run
# sd_booted(): a user manager refuses to run unless this exists. unit-root is where the
# service's sandbox assembles its file system; the system manager makes it on a real machine.
mkdir -p /run/systemd/system /run/systemd/unit-root
install -d -m 700 -o "$uid" -g "$gid" "/run/user/$uid"
mount -t tmpfs -o mode=755 tmpfs /home
install -d -m 700 -o "$uid" -g "$gid" "$home"
cp /etc/passwd "$scratch/passwd"
echo "$name:x:$uid:$gid::$home:/bin/sh" >> "$scratch/passwd"
cp /etc/group "$scratch/group"
echo "$name:x:$gid:" >> "$scratch/group"
mount --bind "$scratch/passwd" /etc/passwd
mount --bind "$scratch/group" /etc/group
# A persistent journal (on a tmpfs) is split per user, which `journalctl --user` needs.
mkdir -p /run/systemd/journald.conf.d
printf '[Journal]\nStorage=persistent\nReadKMsg=no\n' > /run/systemd/journald.conf.d/test.conf
mount -t tmpfs -o mode=755 tmpfs /var/log
/lib/systemd/systemd-journald &
journald=$!
wait_for_socket /run/systemd/journal/io.systemd.journal
journalctl --flush
mount -t cgroup2 cgroup2 /sys/fs/cgroup
cgroup=/sys/fs/cgroup/user.slice/user-$uid.slice/user@$uid.service
mkdir -p "$cgroup"
chown "$uid:$gid" "$cgroup" "$cgroup/cgroup.procs" "$cgroup/cgroup.subtree_control" \
    "$cgroup/cgroup.threads"
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' - "$cgroup" \
    setpriv --reuid "$uid" --regid "$gid" --clear-groups \
    env -i HOME="$home" USER="$name" LOGNAME="$name" PATH=/usr/bin:/bin \
    XDG_RUNTIME_DIR="/run/user/$uid" /lib/systemd/systemd --user --log-target=journal &
wait_for_socket "/run/user/$uid/systemd/private"
echo ready
cat > /dev/null || true
echo 1 > "$cgroup/cgroup.kill"
until grep -qx 'populated 0' "$cgroup/cgroup.events"; do sleep 0.05; done
find "/sys/fs/cgroup/user.slice/user-$uid.slice" -depth -type d -exec rmdir {} + 2>/dev/null
rmdir /sys/fs/cgroup/user.slice 2>/dev/null || true
kill "$journald"
"""


def poll(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """`check()`'s first truthy answer; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (answer := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return answer


def free_id() -> int:
    """A uid and gid that no user or group of this machine has (and not a system one: journald
    gives only uids from 1000 on a journal of their own)."""
    for candidate in range(20000 + os.getpid() % 20000, 60000):
        with contextlib.suppress(KeyError):
            pwd.getpwuid(candidate)
            continue
        with contextlib.suppress(KeyError):
            grp.getgrgid(candidate)
            continue
        return candidate
    raise AssertionError("no free uid between 20000 and 60000")


class UserSession:
    """A throwaway user logged in to a private machine with its own systemd user manager."""

    def __init__(self, scratch: Path) -> None:
        self.uid = free_id()
        self.home = f"/home/{USER_NAME}"
        self.runtime_dir = f"/run/user/{self.uid}"
        script = scratch / "setup.sh"
        script.write_text(NAMESPACE_SETUP)
        self.errors = scratch / "setup.err"  # a file: a pipe nobody reads could fill and block
        with self.errors.open("w") as errors:
            self.proc = subprocess.Popen(
                [
                    *("unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"),
                    *("sh", str(script), USER_NAME, str(self.uid), self.home, str(scratch)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the script's own waits are bounded
        if line != "ready\n":
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(
                f"the namespace with a user manager did not start: {self.errors.read_text()}"
            )
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        self.init_pid = int(children.split()[0])  # PID 1 of the namespace, as seen from here

    def path(self, inside: str) -> Path:
        """A path of the namespace's file system, for root on this side."""
        return Path(f"/proc/{self.init_pid}/root{inside}")

    def give(self, inside: str) -> None:
        """Make everything under `inside` the user's."""
        top = self.path(inside)
        for directory, _, files in os.walk(top):
            os.chown(directory, self.uid, self.uid)
            for name in files:
                os.chown(os.path.join(directory, name), self.uid, self.uid, follow_symlinks=False)

    def run(self, command: str, *, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        """`command` in a shell, as the user, with the environment of a login session (and
        ~/.local/bin on PATH, as `pipx ensurepath` or Debian's ~/.profile put it)."""
        return subprocess.run(
            [
                *("nsenter", "-t", str(self.init_pid), "-m", "-p", "--"),
                *("setpriv", "--reuid", str(self.uid), "--regid", str(self.uid), "--clear-groups"),
                *("env", "-i", f"HOME={self.home}", f"USER={USER_NAME}", f"LOGNAME={USER_NAME}"),
                f"PATH={self.home}/.local/bin:/usr/bin:/bin",
                f"XDG_RUNTIME_DIR={self.runtime_dir}",
                *("sh", "-c", f"cd {cwd or self.home} && {command}"),
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE * 3,  # pipx install builds a wheel and a venv
            check=False,
        )

    def ok(self, command: str, **kwargs: Any) -> str:
        """`run`, which must succeed; its stdout."""
        result = self.run(command, **kwargs)
        assert 0 == result.returncode, f"{command}: {result.stdout}{result.stderr}"
        return result.stdout

    def unit(self, prop: str, unit: str = "sugard.service") -> str:
        return self.ok(f"systemctl --user show -p {prop} --value {unit}").strip()

    def close(self) -> None:
        """End the session: the script tears everything down once its stdin closes."""
        try:
            self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        assert 0 == self.proc.returncode, (
            f"tearing the namespace down failed: {self.errors.read_text()}"
        )


def missing_tools() -> list[str]:
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if not shutil.which(tool)]
    missing += [f"{path} (systemd)" for path in (MANAGER, JOURNALD) if not path.exists()]
    return missing


@pytest.fixture(scope="module")
def session() -> Iterator[UserSession]:
    if os.geteuid() != 0:
        pytest.skip(
            "needs root, to make the namespaces, the throwaway user and its cgroup; "
            "CI runs as root (run: sudo .venv/bin/pytest tests/test_user_service.py)"
        )
    missing = missing_tools()
    assert not missing, f"install: {', '.join(missing)} (scripts/check installs them)"
    scratch = Path(tempfile.mkdtemp(prefix="sd-user-"))
    try:
        user = UserSession(scratch)
        try:
            yield user
        finally:
            user.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def sugar() -> Iterator[FakeSugar]:
    with running_fake(users=PASSWORDS) as server:
        yield server


def write_user_config(
    user: UserSession, sugar: FakeSugar, daemon: dict[str, Any] | None = None, **instances: str
) -> None:
    """The user's ~/.config/sugard/config.toml: one instance per username given, each with
    its password in a 0600 file next to the config."""
    config_dir = user.path(f"{user.home}/.config/sugard")
    config_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, username in instances.items():
        secret = config_dir / f"{name}.password"
        secret.write_text(PASSWORDS[username] + "\n")
        secret.chmod(0o600)
        tables[name] = {
            "url": sugar.url,
            "username": username,
            "password_file": f"~/.config/sugard/{name}.password",
        }
    config = config_dir / "config.toml"
    config.write_text(tomli_w.dumps({"daemon": daemon or {}, "instances": tables}))
    config.chmod(0o600)
    user.give(f"{user.home}/.config")


def readme_line(starting: str) -> str:
    """The one line of the README's shell blocks that starts with `starting`."""
    lines = [
        line.split("#")[0].strip()
        for block in shell_blocks(README)
        for line in block.splitlines()
        if line.startswith(starting)
    ]
    assert 1 == len(lines), (starting, lines)
    return lines[0]


def readme_block(first_line: str) -> str:
    """The README's shell block that begins with `first_line`."""
    blocks = [block for block in shell_blocks(README) if block.startswith(first_line)]
    assert 1 == len(blocks), first_line
    return blocks[0]


@pytest.fixture(scope="module")
def installed(session: UserSession, sugar: FakeSugar) -> UserSession:
    """sugard installed and enabled by the README's own commands, from the user's clone."""
    clone = f"{session.home}/{CHECKOUT}"
    shutil.copytree(
        ROOT,
        session.path(clone),
        ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".*_cache"),
    )
    session.give(clone)
    write_user_config(session, sugar, prod=USER)
    started = time.monotonic()
    session.ok(readme_line("pipx install"), cwd=clone)
    print(f"\n{readme_line('pipx install')}: {time.monotonic() - started:.1f} s")
    session.ok(f"set -e; {readme_block('install -Dm644 systemd/')}", cwd=clone)
    return session


def token(user: UserSession, name: str = "prod") -> str:
    return user.ok(f"sugarctl token {name}").strip()


def test_linger_is_not_exercised_here() -> None:
    """The README's `loginctl enable-linger` is systemd-logind's job, and the throwaway user is
    not logind's (the test starts its manager itself), so it cannot run here; this says so in
    the summary. Without logind, loginctl fails with the message docs/operations.md quotes."""
    result = subprocess.run(
        ["loginctl", "show-user", "root", "-p", "Linger"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    if result.returncode == 0:
        pytest.skip(
            "not run: loginctl enable-linger (logind runs here, but does not know the "
            "test's throwaway user)"
        )
    assert "System has not been booted with systemd" in result.stderr, result.stderr
    pytest.skip(
        "not run: loginctl enable-linger (no systemd-logind on this machine, and linger is "
        "logind's; the user manager is started by the test)"
    )


def test_enable_now_serves_tokens_through_the_socket_unit(
    installed: UserSession, sugar: FakeSugar
) -> None:
    """After the README's install block, both units are enabled and active, `sugarctl ping`
    answers on systemd's socket, and the token is one Sugar accepts."""
    user = installed
    for unit in ("sugard.socket", "sugard.service"):
        assert "enabled" == user.ok(f"systemctl --user is-enabled {unit}").strip()
        assert "active" == user.ok(f"systemctl --user is-active {unit}").strip()
    assert user.ok("sugarctl ping").startswith("ok sugard ")
    assert sugar.valid(token(user))
    status = user.unit("StatusText")
    assert status == f"serving 1 instance(s) on {user.runtime_dir}/sugard/sugard.sock", status


def test_reload_fails_on_a_refused_config_and_keeps_the_old_one(
    installed: UserSession, sugar: FakeSugar
) -> None:
    """`systemctl --user reload sugard` exits 0 on a good config (the added instance serves,
    the unchanged one keeps its token) and non-zero on a bad one, which changes nothing."""
    user = installed
    before = token(user)
    main_pid = user.unit("MainPID")

    write_user_config(user, sugar, prod=USER, second="bob")
    user.ok("systemctl --user reload sugard")
    assert sugar.valid(token(user, "second"))
    assert before == token(user)

    write_user_config(user, sugar, daemon={"bogus": 1}, prod=USER)
    refused = user.run("systemctl --user reload sugard")
    assert 0 != refused.returncode, refused.stdout + refused.stderr
    assert "sugard.service failed" in refused.stderr, refused.stderr
    assert user.unit("StatusText").startswith("reload failed, still running the old config: ")
    assert "active" == user.unit("ActiveState")
    assert main_pid == user.unit("MainPID")
    assert before == token(user)
    assert sugar.valid(token(user, "second"))  # the old config, all of it


def test_a_sighup_sent_by_hand_still_reloads(installed: UserSession, sugar: FakeSugar) -> None:
    """kill -HUP on the main process reloads too (systemd only hears of it by sd_notify)."""
    user = installed
    write_user_config(user, sugar, prod=USER)
    user.ok(f"kill -HUP {user.unit('MainPID')}")
    poll(
        "the reload that drops instance 'second'",
        lambda: user.unit("StatusText").startswith("reloaded (0 added, 1 removed"),
    )
    gone = user.run("sugarctl token second")
    assert 3 == gone.returncode, gone.stderr


def test_a_restart_on_a_refused_config_answers_instead_of_looping(
    installed: UserSession, sugar: FakeSugar
) -> None:
    """`systemctl --user restart sugard` with a config sugard refuses: the unit is active
    with the problem in its status, no restart follows, `sugarctl token` exits 6 at once
    naming the problem, the journal has it once; `systemctl --user reload sugard` of the
    fixed config serves tokens again."""
    user = installed
    write_user_config(user, sugar, daemon={"bogus": 1}, prod=USER)
    user.ok("systemctl --user reset-failed sugard")
    restarts = user.unit("NRestarts")
    user.ok("systemctl --user restart sugard")
    main_pid = user.unit("MainPID")
    assert "active" == user.unit("ActiveState")
    assert user.unit("StatusText").startswith("config refused, serving no instance: ")
    started = time.monotonic()
    refused = user.run("sugarctl token prod")
    assert time.monotonic() - started < DEADLINE / 4
    assert 6 == refused.returncode, refused.stderr
    assert 1 == len(refused.stderr.splitlines()) and "daemon.bogus" in refused.stderr
    time.sleep(3)  # longer than RestartSec=2s: a loop would show by now
    assert (restarts, main_pid) == (user.unit("NRestarts"), user.unit("MainPID"))
    journal = user.ok(f"journalctl --user -u sugard --no-pager -o cat _PID={main_pid}")
    assert 1 == journal.count("config refused: ")

    write_user_config(user, sugar, prod=USER)
    user.ok("systemctl --user reload sugard")
    assert sugar.valid(token(user))
    assert main_pid == user.unit("MainPID")


def test_kill_9_is_restarted(installed: UserSession, sugar: FakeSugar) -> None:
    """SIGKILL is a failure: Restart=on-failure starts a new sugard, which serves tokens."""
    user = installed
    killed = user.unit("MainPID")
    user.ok(f"kill -9 {killed}")
    poll(
        "sugard restarted after kill -9",
        lambda: user.unit("MainPID") not in ("0", killed) and user.unit("ActiveState") == "active",
    )
    assert sugar.valid(token(user))
    assert int(user.unit("NRestarts")) >= 1


def test_stopped_service_is_started_by_the_next_connection(
    installed: UserSession, sugar: FakeSugar
) -> None:
    """With sugard.service stopped, sugard.socket still listens, and the next `sugarctl token`
    starts sugard and gets its token."""
    user = installed
    user.ok("systemctl --user stop sugard.service")
    assert "inactive" == user.unit("ActiveState")
    assert "active" == user.unit("ActiveState", "sugard.socket")
    assert sugar.valid(token(user))
    assert "active" == user.unit("ActiveState")


def test_a_restart_keeps_the_session(installed: UserSession, sugar: FakeSugar) -> None:
    """`systemctl --user restart sugard`: the session goes through the manager's fd store
    (FileDescriptorStoreMax=), so the same token is served after, for no login; with the
    password changed in the config (and at Sugar) the kept session is dropped: one login."""
    user = installed
    before = token(user)
    logins = sugar.calls["password"]
    user.ok("systemctl --user restart sugard")
    assert before == token(user)
    assert logins == sugar.calls["password"]
    assert "0" == user.unit("NFileDescriptorStore")  # sugard took it back, and out

    secret = user.path(f"{user.home}/.config/sugard/prod.password")
    try:
        sugar.set_password(USER, "changed-for-the-restart")
        secret.write_text("changed-for-the-restart\n")
        user.ok("systemctl --user restart sugard")
        after = token(user)
        assert after != before and sugar.valid(after)
        assert logins + 1 == sugar.calls["password"]
    finally:
        sugar.set_password(USER, PASSWORD)
        secret.write_text(PASSWORD + "\n")
    lines = user.ok("journalctl --user -u sugard --no-pager -o cat")
    assert "took back the session kept across the restart" in lines
    assert "prod: its login settings changed since the session was kept; logging in" in lines


def test_a_rejected_password_stays_rejected_across_a_crash_and_a_restart(
    installed: UserSession, sugar: FakeSugar
) -> None:
    """Sugar rejects the password: the sugard that systemd starts after `kill -9`
    (Restart=on-failure), and the one after `systemctl --user restart`, do not send it again
    (the rejection was in the fd store from the moment it was made); once Sugar takes the
    password again, `sugarctl refresh --retry-rejected` sends it once, and the store is empty."""
    user = installed
    user.ok("sugarctl reload")  # the password the daemon holds is the file's (tests before)
    token(user)
    sugar.set_password(USER, "changed-at-sugar-only")
    try:
        sugar.evict(USER, "sugard")  # so the next renewal must log in with the password
        failed = user.run("sugarctl refresh prod")
        assert 6 == failed.returncode, failed.stderr
        logins = sugar.calls["password"]
        poll("the rejection in the fd store", lambda: "1" == user.unit("NFileDescriptorStore"))

        # The tests before restarted sugard often: a crash now would meet the start rate
        # limit (StartLimitBurst=5 in 10 s) and no restart at all, which tests nothing here.
        user.ok("systemctl --user reset-failed sugard")
        killed = user.unit("MainPID")
        user.ok(f"kill -9 {killed}")
        poll(
            "sugard restarted after kill -9",
            lambda: (
                user.unit("MainPID") not in ("0", killed) and user.unit("ActiveState") == "active"
            ),
        )
        for restarted_by in ("kill -9", "systemctl --user restart sugard"):
            if restarted_by != "kill -9":
                user.ok(restarted_by)
            refused = user.run("sugarctl token prod --wait 5")
            assert 6 == refused.returncode, (restarted_by, refused.stdout, refused.stderr)
            assert "has not changed since" in refused.stderr, restarted_by
            assert logins == sugar.calls["password"], restarted_by
    finally:
        sugar.set_password(USER, PASSWORD)
    fixed = user.run("sugarctl refresh prod --retry-rejected")
    assert 0 == fixed.returncode, fixed.stderr
    assert sugar.valid(fixed.stdout.strip())
    assert logins + 1 == sugar.calls["password"]
    poll("the rejection gone from the fd store", lambda: "0" == user.unit("NFileDescriptorStore"))
    lines = user.ok("journalctl --user -u sugard --no-pager -o cat")
    assert "prod: Sugar rejected its password before the restart" in lines
    assert "changed-at-sugar-only" not in lines


def test_journal_shows_the_service_and_no_secret(installed: UserSession, sugar: FakeSugar) -> None:
    """`journalctl --user -u sugard`, as the user, shows sugard's own lines (with the refused
    reload) and, in every field of every entry of the user's journal, no password or token."""
    user = installed
    token(user)  # at least one token served
    lines = user.ok("journalctl --user -u sugard --no-pager -o cat")
    assert "sugard.daemon: reload refused, old config kept: " in lines
    assert "(socket passed in by systemd)" in lines
    everything = user.ok("journalctl --user --no-pager -o verbose")
    secrets = {*PASSWORDS.values(), *sugar.issued, *sugar.received_secrets()}
    leaked = [secret for secret in secrets if secret in everything]
    print(f"\nscanned {len(everything.splitlines())} journal lines for {len(secrets)} secrets")
    assert [] == leaked


def test_uninstall_as_the_readme_says_leaves_nothing(installed: UserSession) -> None:
    """The README's uninstall block (run last: it removes what the other tests use) stops and
    removes the units, sugard and sugarctl, the config and the socket."""
    user = installed
    user.ok(f"set -e; {readme_block('systemctl --user disable --now')}")
    gone = user.run("systemctl --user status sugard.service sugard.socket")
    assert 4 == gone.returncode, gone.stdout + gone.stderr  # 4: no such unit
    left = [
        path
        for path in (".local/bin/sugard", ".local/bin/sugarctl", ".config/sugard")
        if user.path(f"{user.home}/{path}").exists()
    ]
    assert [] == left
    assert not user.path(f"{user.runtime_dir}/sugard").exists()
