"""`sugard init`: on a real pseudo-terminal and with flags; the written config runs the daemon."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from support.daemon import PASSWORD, SUGARD, USER, sugarctl

from sugard.config import load_config
from sugard.testing import FakeSugar


class Terminal:
    """A command whose controlling terminal is a fresh pty, as when a person types it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        # setsid -c makes the pty the controlling terminal, so getpass uses /dev/tty as it
        # would for a person, not a fallback.
        self.proc = subprocess.Popen(
            ["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        self.fd = master
        self.output = ""
        self._seen = 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the other side is closed
            return False
        if not chunk:
            return False
        self.output += chunk.decode("utf-8", "replace")
        return True

    def expect(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output[self._seen :]:
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"{text!r} never came; the terminal showed:\n{self.output}")
        self._seen = self.output.index(text, self._seen) + len(text)

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def finish(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.1) and time.monotonic() < deadline:
            if self.proc.poll() is not None and not select.select([self.fd], [], [], 0)[0]:
                break
        os.close(self.fd)
        return self.proc.wait(timeout)


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SUGARD_CONFIG"}
    env.update(extra)
    return env


def init(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`sugard init` with stdin from a pipe: the scripted way."""
    return subprocess.run(
        [SUGARD, "init", *args],
        input=input or "",
        capture_output=True,
        text=True,
        timeout=30,
        env=env_with(**env),
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_interactive_init_on_a_terminal_writes_a_config_the_daemon_runs(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """On a terminal init asks, re-asks a bad URL, hides the password; the daemon then logs in."""
    xdg = short_dir / "xdg"
    term = Terminal([SUGARD, "init"], env_with(XDG_CONFIG_HOME=str(xdg)))
    term.expect("Instance name [prod]: ")
    term.send("")
    term.expect("Site URL (like https://crm.example.com): ")
    term.send("crm.example.com")
    term.expect("must start with https:// (or http://), not 'crm.example.com'")
    term.expect("Site URL (like https://crm.example.com): ")
    term.send(fake.url)
    term.expect("Username: ")
    term.send(USER)
    term.expect(f"Password for {USER} (not shown): ")
    term.send(PASSWORD)
    term.expect("Again, to be sure (not shown): ")
    term.send(PASSWORD)
    term.expect("must be registered in Sugar first: Admin > Configure API Platforms")
    term.expect("Platform [sugard]: ")
    term.send("")
    term.expect("OAuth2 client id [sugar]: ")
    term.send("")
    assert 0 == term.finish(), term.output
    assert PASSWORD not in term.output

    config = xdg / "sugard" / "config.toml"
    secret = xdg / "sugard" / "prod.password"
    assert (0o700, 0o600, 0o600) == (mode(config.parent), mode(config), mode(secret))
    assert PASSWORD + "\n" == secret.read_text()
    assert PASSWORD not in config.read_text()
    assert {
        "defaults": {"platform": "sugard", "client_id": "sugar"},
        "instances": {"prod": {"url": fake.url, "username": USER, "password_file": str(secret)}},
    } == tomllib.loads(config.read_text())

    daemon = start_daemon(config)
    result = sugarctl(daemon.socket, "token", "prod")
    assert 0 == result.returncode, result.stderr
    assert fake.valid(result.stdout.strip())


def test_interactive_init_asks_the_client_secret_only_for_a_client_of_ones_own(
    short_dir: Path,
) -> None:
    """The built-in client `sugar` has no secret; another client's secret goes to its own file."""
    config = short_dir / "c" / "config.toml"
    term = Terminal(
        [
            SUGARD,
            "init",
            "-c",
            str(config),
            "--instance",
            "crm",
            "--url",
            "https://crm.example.com",
        ],
        env_with(),
    )
    term.expect("Username: ")
    term.send("api")
    term.expect("Password for api (not shown): ")
    term.send("pw-typed-here")
    term.expect("Again, to be sure (not shown): ")
    term.send("pw-typed-here")
    term.expect("Platform [sugard]: ")
    term.send("Bad Name")
    term.expect("like 'bad_name'")
    term.expect("Platform [sugard]: ")
    term.send("scripts")
    term.expect("OAuth2 client id [sugar]: ")
    term.send("etl")
    term.expect("Client secret of etl, empty if it has none (not shown): ")
    term.send("client-secret-typed")
    term.expect("Again, to be sure (not shown): ")
    term.send("client-secret-typed")
    assert 0 == term.finish(), term.output
    assert "client-secret-typed" not in term.output
    table = tomllib.loads(config.read_text())["instances"]["crm"]
    secret_file = short_dir / "c" / "crm.client_secret"
    assert {
        "url": "https://crm.example.com",
        "username": "api",
        "password_file": str(short_dir / "c" / "crm.password"),
        "platform": "scripts",
        "client_id": "etl",
        "client_secret_file": str(secret_file),
    } == table
    assert 0o600 == mode(secret_file)
    assert "client-secret-typed" == load_config(config).instances["crm"].client_secret.reveal()


def test_ctrl_d_on_the_terminal_writes_nothing(short_dir: Path) -> None:
    """End of input at a prompt cancels init and leaves no file behind."""
    config = short_dir / "config.toml"
    term = Terminal([SUGARD, "init", "-c", str(config)], env_with())
    term.expect("Instance name [prod]: ")
    os.write(term.fd, b"\x04")
    assert 1 == term.finish()
    assert "cancelled; nothing was written" in term.output
    assert [] == list(short_dir.iterdir())


def test_scripted_init_with_password_on_stdin_runs_the_daemon(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Flags and --password-stdin need no terminal; the password lands in NAME.password only."""
    config = short_dir / "config.toml"
    result = init(
        "-c",
        str(config),
        "--instance",
        "ci",
        "--url",
        fake.url,
        "--username",
        USER,
        "--password-stdin",
        input=PASSWORD + "\n",
    )
    assert 0 == result.returncode, result.stderr
    assert f"wrote instance ci to {config} (mode 0600; instances: ci)\n" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr + config.read_text()
    assert PASSWORD + "\n" == (short_dir / "ci.password").read_text()
    daemon = start_daemon(config)
    token = sugarctl(daemon.socket, "token", "ci")
    assert 0 == token.returncode, token.stderr
    assert fake.valid(token.stdout.strip())


def test_scripted_init_with_the_other_password_sources(short_dir: Path) -> None:
    """--password-file/-env/-command are written as references, as given; no password file
    is created."""
    (short_dir / "pw.txt").write_text("pw\n")
    (short_dir / "pw.txt").chmod(0o600)
    for flag, value, key in (
        ("--password-file", "pw.txt", "password_file"),
        ("--password-env", "SUGAR_PW", "password_env"),
        ("--password-command", "pass show sugar", "password_command"),
    ):
        config = short_dir / f"{key}.toml"
        result = init(
            "-c",
            str(config),
            "--instance",
            "p",
            "--url",
            "https://a.example.com",
            "--username",
            "u",
            flag,
            value,
        )
        assert 0 == result.returncode, result.stderr
        assert {"url": "https://a.example.com", "username": "u", key: value} == (
            tomllib.loads(config.read_text())["instances"]["p"]
        )
    assert not (short_dir / "p.password").exists()


def test_init_refuses_to_overwrite_without_force(short_dir: Path) -> None:
    """An existing config stays untouched without --force; with it, the old one is backed up."""
    config = short_dir / "config.toml"
    config.write_text("# my precious config\n")
    args = [
        "-c",
        str(config),
        "--instance",
        "p",
        "--url",
        "https://a.example.com",
        "--username",
        "u",
        "--password-env",
        "PW",
    ]
    refused = init(*args)
    assert 1 == refused.returncode
    assert (
        f"sugard init: {config} exists; use --force to overwrite it, "
        "or --add NAME to add an instance to it\n"
    ) == refused.stderr
    assert "# my precious config\n" == config.read_text()

    forced = init(*args, "--force")
    assert 0 == forced.returncode, forced.stderr
    assert "PW" == tomllib.loads(config.read_text())["instances"]["p"]["password_env"]
    backup = short_dir / "config.toml.bak"
    assert "# my precious config\n" == backup.read_text()
    assert f"kept the previous file as {backup}" in forced.stdout
    assert 0o600 == mode(config)


def test_init_refuses_to_overwrite_a_password_file(short_dir: Path) -> None:
    """An existing NAME.password is neither overwritten nor is the config written."""
    (short_dir / "p.password").write_text("old\n")
    result = init(
        "-c",
        str(short_dir / "config.toml"),
        "--instance",
        "p",
        "--url",
        "https://a.example.com",
        "--username",
        "u",
        "--password-stdin",
        input="new\n",
    )
    assert 1 == result.returncode
    assert f"{short_dir / 'p.password'} exists; use --force to overwrite it" in result.stderr
    assert "old\n" == (short_dir / "p.password").read_text()
    assert not (short_dir / "config.toml").exists()


def test_add_keeps_the_other_instances_and_a_backup(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """--add puts a second instance next to the first, keeps the old file, and both log in."""
    config = short_dir / "config.toml"
    first = init(
        "-c",
        str(config),
        "--instance",
        "prod",
        "--url",
        fake.url,
        "--username",
        USER,
        "--password-stdin",
        input=PASSWORD,
    )
    assert 0 == first.returncode, first.stderr
    config.write_text("# edited by hand\n" + config.read_text())
    before = config.read_text()

    added = init(
        "-c",
        str(config),
        "--add",
        "ops",
        "--url",
        fake.url,
        "--username",
        "admin",
        "--platform",
        "mobile",
        "--password-stdin",
        input="admin-pw\n",
    )
    assert 0 == added.returncode, added.stderr
    backup = short_dir / "config.toml.bak"
    assert (
        f"kept the previous file as {backup}: comments are not carried over, "
        "copy back any you want to keep\n"
    ) in added.stdout
    assert before == backup.read_text()
    assert 0o600 == mode(backup)
    document = tomllib.loads(config.read_text())
    assert ["prod", "ops"] == list(document["instances"])
    assert "mobile" == document["instances"]["ops"]["platform"]
    assert "platform" not in document["instances"]["prod"]

    again = init(
        "-c",
        str(config),
        "--add",
        "ops",
        "--url",
        fake.url,
        "--username",
        "x",
        "--password-env",
        "X",
    )
    assert 1 == again.returncode
    assert f"sugard init: {config} already has instance 'ops'; use --force to replace it\n" == (
        again.stderr
    )

    daemon = start_daemon(config)
    for name in ("prod", "ops"):
        token = sugarctl(daemon.socket, "token", name)
        assert 0 == token.returncode, token.stderr
        assert fake.valid(token.stdout.strip())


def test_second_add_keeps_the_first_backup(short_dir: Path) -> None:
    """A backup is never overwritten: it may be the only copy of the user's comments."""
    config = short_dir / "config.toml"
    base = ["--url", "https://a.example.com", "--password-env", "PW"]
    assert 0 == init("-c", str(config), "--instance", "a", "--username", "a", *base).returncode
    config.write_text("# the original comments\n" + config.read_text())
    assert 0 == init("-c", str(config), "--add", "b", "--username", "b", *base).returncode
    assert 0 == init("-c", str(config), "--add", "c", "--username", "c", *base).returncode
    assert (short_dir / "config.toml.bak").read_text().startswith("# the original comments")
    assert ["a", "b"] == list(
        tomllib.loads((short_dir / "config.toml.bak.1").read_text())["instances"]
    )
    assert ["a", "b", "c"] == list(load_config(config, {"PW": "x"}).instances)


def test_add_needs_an_existing_valid_file(short_dir: Path) -> None:
    """--add on a missing or broken file says what to do and writes nothing."""
    args = [
        "--add",
        "b",
        "--url",
        "https://a.example.com",
        "--username",
        "u",
        "--password-env",
        "PW",
    ]
    missing = init("-c", str(short_dir / "none.toml"), *args)
    assert 1 == missing.returncode
    assert "none.toml does not exist; create it with `sugard init` (without --add)" in (
        missing.stderr
    )
    broken = short_dir / "broken.toml"
    broken.write_text("[instances\n")
    result = init("-c", str(broken), *args)
    assert 1 == result.returncode
    assert f"sugard init: cannot add to {broken}: " in result.stderr
    assert "[instances\n" == broken.read_text()


def test_scripted_init_names_what_is_missing_or_wrong(short_dir: Path) -> None:
    """Without a terminal, missing and bad flags are named, exit 2, and nothing is written."""
    config = short_dir / "config.toml"
    missing = init("-c", str(config), "--url", "https://a.example.com")
    assert 2 == missing.returncode
    assert (
        "sugard init: needs --instance, --username, the password (--password-stdin, "
        "--password-file, --password-env or --password-command) when stdin is not a terminal\n"
    ) == missing.stderr
    for flag, value, message in (
        ("--instance", "-x", "'-x' is not a valid instance name"),
        ("--url", "https://a.example.com/rest/v10", "give the site root"),
        ("--platform", "Web UI", "'Web UI' is not a valid platform name"),
    ):
        args = {"--instance": "p", "--url": "https://a.example.com", "--platform": "sugard"}
        args[flag] = value
        bad = init(
            "-c",
            str(config),
            "--username",
            "u",
            "--password-env",
            "PW",
            *[f"{key}={value}" for key, value in args.items()],
        )
        assert 2 == bad.returncode
        assert bad.stderr.startswith(f"sugard init: {flag}: {message}"), bad.stderr
    empty = init(
        "-c",
        str(config),
        "--instance",
        "p",
        "--url",
        "https://a.example.com",
        "--username",
        "u",
        "--password-stdin",
        input="\n",
    )
    assert 2 == empty.returncode
    assert "sugard init: --password-stdin: stdin held no password\n" == empty.stderr
    assert [] == list(short_dir.iterdir())


def test_interactive_init_asks_the_password_twice(short_dir: Path) -> None:
    """Two different entries are asked again: a typo would only show as a rejected login."""
    config = short_dir / "config.toml"
    term = Terminal(
        [SUGARD, "init", "-c", str(config), "--instance", "p", "--url", "https://a.example.com"],
        env_with(),
    )
    term.expect("Username: ")
    term.send("api")
    term.expect("Password for api (not shown): ")
    term.send("first-try")
    term.expect("Again, to be sure (not shown): ")
    term.send("first-tyr")
    term.expect("the two differ; once more")
    term.expect("Password for api (not shown): ")
    term.send("second-try")
    term.expect("Again, to be sure (not shown): ")
    term.send("second-try")
    term.expect("Platform [sugard]: ")
    term.send("")
    term.expect("OAuth2 client id [sugar]: ")
    term.send("")
    assert 0 == term.finish(), term.output
    assert "second-try\n" == (short_dir / "p.password").read_text()


def test_interactive_init_offers_an_existing_password_file_before_any_question(
    short_dir: Path,
) -> None:
    """An existing NAME.password is raised before the questions: used as is if wanted (and
    usable), else nothing is asked and nothing written."""
    config = short_dir / "config.toml"
    secret = short_dir / "p.password"
    secret.write_text("kept-pw\n")
    secret.chmod(0o600)
    argv = [SUGARD, "init", "-c", str(config), "--instance", "p"]

    declined = Terminal(argv, env_with())
    declined.expect(f"{secret} exists: use the password in it? [Y/n] [y]: ")
    declined.send("n")
    assert 1 == declined.finish()
    assert "Site URL" not in declined.output
    assert f"{secret} exists; use --force to overwrite it" in declined.output
    assert not config.exists()

    used = Terminal(argv, env_with())
    used.expect(f"{secret} exists: use the password in it? [Y/n] [y]: ")
    used.send("")
    used.expect("Site URL (like https://crm.example.com): ")
    used.send("https://a.example.com")
    used.expect("Username: ")
    used.send("api")
    used.expect("Platform [sugard]: ")
    used.send("")
    used.expect("OAuth2 client id [sugar]: ")
    used.send("")
    assert 0 == used.finish(), used.output
    assert "Password for" not in used.output
    assert str(secret) == tomllib.loads(config.read_text())["instances"]["p"]["password_file"]
    assert "kept-pw\n" == secret.read_text()

    config.unlink()
    secret.chmod(0o644)
    loose = Terminal(argv, env_with())
    loose.expect("[Y/n] [y]: ")
    loose.send("y")
    assert 1 == loose.finish()
    assert f"is readable by others (mode 0644); run: chmod 600 {secret}" in loose.output
    assert "Site URL" not in loose.output
    assert not config.exists()


@pytest.mark.slow
def test_password_files_are_written_as_given_and_checked_first(short_dir: Path) -> None:
    """`~/x` stays `~/x`, a path relative to the config stays relative; a file that is not
    there (or only relative to the current directory) is refused before anything is read."""
    home = short_dir / "home"
    home.mkdir()
    (home / "pw").write_text("pw\n")
    (home / "pw").chmod(0o600)
    sub = short_dir / "cfg"
    sub.mkdir()
    (sub / "rel.pw").write_text("pw\n")
    (sub / "rel.pw").chmod(0o600)
    base = ["--instance", "p", "--url", "https://a.example.com", "--username", "u"]
    for given, config in (("~/pw", sub / "a.toml"), ("rel.pw", sub / "b.toml")):
        result = init("-c", str(config), *base, "--password-file", given, HOME=str(home))
        assert 0 == result.returncode, result.stderr
        assert given == tomllib.loads(config.read_text())["instances"]["p"]["password_file"]
        checked = subprocess.run(
            [SUGARD, "check", "--unit", "none", "-c", str(config)],
            capture_output=True,
            text=True,
            env=env_with(HOME=str(home)),
            timeout=30,
            check=False,
        )
        assert (0, "") == (checked.returncode, checked.stderr)

    missing = init("-c", str(sub / "c.toml"), *base, "--password-file", "nope.pw")
    assert 2 == missing.returncode
    assert missing.stderr.startswith(
        f"sugard init: --password-file nope.pw: file {sub / 'nope.pw'} does not exist"
    )
    cwd_only = subprocess.run(
        [SUGARD, "init", "-c", str(short_dir / "d.toml"), *base, "--password-file", "pw"],
        capture_output=True,
        text=True,
        cwd=home,
        env=env_with(),
        timeout=30,
        check=False,
    )
    assert 2 == cwd_only.returncode
    assert (
        f"a relative path is relative to the config's directory ({short_dir}), as sugard "
        f"reads it: give {home / 'pw'}\n"
    ) in cwd_only.stderr
    assert not (short_dir / "c.toml").exists()
    assert not (short_dir / "d.toml").exists()


def test_add_proposes_a_platform_of_its_own_when_the_session_is_taken(short_dir: Path) -> None:
    """--add for a user and site another instance already logs in to on that platform: the
    flags are refused, naming it; on a terminal sugard_<name> is proposed and taken."""
    config = short_dir / "config.toml"
    base = ["--url", "https://a.example.com", "--username", "api", "--password-env", "PW"]
    assert 0 == init("-c", str(config), "--instance", "prod", *base).returncode
    clash = (
        "instance prod already logs in as api at https://a.example.com on platform 'sugard', "
        "and Sugar keeps one session per user and platform: Ops.1 needs a platform of its "
        "own, like sugard_ops_1"
    )
    scripted = init("-c", str(config), "--add", "Ops.1", *base)
    assert (2, f"sugard init: {clash}: add --platform\n") == (
        scripted.returncode,
        scripted.stderr,
    )
    explicit = init("-c", str(config), "--add", "Ops.1", *base, "--platform", "sugard")
    assert (2, f"sugard init: --platform: {clash}\n") == (explicit.returncode, explicit.stderr)

    term = Terminal(
        [SUGARD, "init", "-c", str(config), "--add", "Ops.1", "--url", "https://a.example.com"],
        env_with(),
    )
    term.expect("Username: ")
    term.send("api")
    term.expect("Password for api (not shown): ")
    term.send("pw")
    term.expect("Again, to be sure (not shown): ")
    term.send("pw")
    term.expect(clash + ".")
    term.expect("Platform [sugard_ops_1]: ")
    term.send("sugard")
    term.expect(clash)
    term.expect("Platform [sugard_ops_1]: ")
    term.send("")
    term.expect("OAuth2 client id [sugar]: ")
    term.send("")
    assert 0 == term.finish(), term.output
    document = tomllib.loads(config.read_text())
    assert "sugard_ops_1" == document["instances"]["Ops.1"]["platform"]
    assert ["Ops.1", "prod"] == sorted(load_config(config, {"PW": "x"}).instances)
    assert "pw\n" == (short_dir / "Ops.1.password").read_text()
