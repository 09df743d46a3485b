"""`sugard check`: every problem as `file: table.key: message` with its fix; `--online` asks the
running daemon, never Sugar."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import ROOT
from support.daemon import PASSWORD, SUGARD, USER, instance, sugarctl, write_config

from sugard.testing import FakeSugar

REPO = ROOT
GOOD = '[instances.prod]\nurl = "https://crm.example.com"\nusername = "api"\n'


def check(
    *args: str, env: dict[str, str] | None = None, unit: str | None = "none"
) -> subprocess.CompletedProcess[str]:
    """`sugard check --unit UNIT ARGS`; the tests' files are under /tmp, which the shipped
    unit's sandbox hides (PrivateTmp=yes), so only the tests of that warning pass unit=None
    (the default: the installed unit, else the shipped one)."""
    return subprocess.run(
        [SUGARD, "check", *(("--unit", unit) if unit else ()), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def config_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def secret_file(directory: Path, name: str = "pw", mode: int = 0o600) -> Path:
    path = directory / name
    path.write_text("s3cret-in-a-file\n")
    path.chmod(mode)
    return path


def test_a_good_config_is_ok(tmp_path: Path) -> None:
    """A valid config with a readable secret exits 0 and names its instances."""
    secret_file(tmp_path)
    path = config_file(tmp_path, GOOD + 'password_file = "pw"\n')
    result = check("-c", str(path))
    assert (0, f"{path}: ok (1 instance(s): prod)\n", "") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )


def test_wrong_type(tmp_path: Path) -> None:
    """A number in quotes is a wrong type, and the message says to drop the quotes."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\ntimeout = "10"\n')
    result = check("-c", str(path), env={"PW": "x"})
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.timeout: must be a number, not a string; write 10 without quotes\n"
    ) == result.stderr


def test_unknown_key(tmp_path: Path) -> None:
    """A misspelt key is unknown, with the key that was probably meant."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\nrefresh_befor = 60\n')
    result = check("-c", str(path), env={"PW": "x"})
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.refresh_befor: unknown key (did you mean refresh_before?)\n"
    ) == result.stderr


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    """A key like nothing known gets the list of instance keys."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\ncolour = "blue"\n')
    result = check("-c", str(path))
    assert result.stderr.startswith(
        f"{path}: instances.prod.colour: unknown key; instance keys are url, username, password"
    )


def test_missing_secret_file(tmp_path: Path) -> None:
    """A password_file that is not there is named, with how to create it."""
    path = config_file(tmp_path, GOOD + 'password_file = "prod.password"\n')
    result = check("-c", str(path))
    missing = tmp_path / "prod.password"
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.password_file: file {missing} does not exist; create it with "
        f"the secret on one line (chmod 600 {missing}), or fix the path\n"
    ) == result.stderr


def test_loose_secret_file_mode(tmp_path: Path) -> None:
    """A secret file others can read is refused with the chmod that fixes it."""
    loose = secret_file(tmp_path, mode=0o644)
    path = config_file(tmp_path, GOOD + 'password_file = "pw"\n')
    result = check("-c", str(path))
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.password_file: {loose} is readable by others (mode 0644); "
        f"run: chmod 600 {loose}\n"
    ) == result.stderr


def test_loose_config_mode_with_an_inline_secret(tmp_path: Path) -> None:
    """A config holding an inline password must not be readable by others."""
    path = config_file(tmp_path, GOOD + 'password = "inline-pw"\n', mode=0o644)
    result = check("-c", str(path))
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.password: holds an inline secret but the file is readable by "
        f"others (mode 0644); run: chmod 600 {path}\n"
    ) == result.stderr


def test_config_writable_by_others(tmp_path: Path) -> None:
    """Anyone who can edit the config can run commands as its owner: check says so."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\n', mode=0o664)
    result = check("-c", str(path), env={"PW": "x"})
    assert 1 == result.returncode
    assert (
        f"{path}: is writable by others (mode 0664): whoever can edit it can make sugard run a "
        f"password_command or send the password elsewhere; run: chmod 600 {path}\n"
    ) == result.stderr


def test_invalid_platform_name(tmp_path: Path) -> None:
    """A platform outside Sugar's pattern is refused with a valid spelling to use instead."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\nplatform = "Sugard Scripts"\n')
    result = check("-c", str(path), env={"PW": "x"})
    assert 1 == result.returncode
    assert (
        f"{path}: instances.prod.platform: 'Sugard Scripts' is not a valid platform name: use "
        "1-127 of a-z, 0-9, '_' and '-', like 'sugard_scripts' (and register it in Sugar: "
        "Admin > Configure API Platforms)\n"
    ) == result.stderr


def test_all_problems_at_once_and_secrets_checked_despite_them(tmp_path: Path) -> None:
    """Shape problems and the checks that need the file's shape are all in one run."""
    path = config_file(
        tmp_path,
        GOOD + 'password_env = "PW"\nclient_secret = "x"\nca_file = "nope.pem"\n',
        mode=0o666,
    )
    result = check("-c", str(path))
    assert [
        f"{path}: instances.prod.client_secret: holds an inline secret but the file is "
        f"readable by others (mode 0666); run: chmod 600 {path}",
        f"{path}: instances.prod.password_env: environment variable PW is not set",
        f"{path}: is writable by others (mode 0666): whoever can edit it can make sugard run a "
        f"password_command or send the password elsewhere; run: chmod 600 {path}",
        f"{path}: instances.prod.ca_file: file {tmp_path / 'nope.pem'} does not exist; give "
        "the PEM file of the CA that signed the site's certificate",
        f"{path}: instances.prod.client_secret: the built-in client 'sugar' has an empty "
        "secret and Sugar refuses any other; remove the client secret, or set client_id to "
        "your own OAuth key",
    ] == result.stderr.splitlines()
    assert "" == result.stdout


def test_a_relative_ca_file_is_found_next_to_the_config(tmp_path: Path) -> None:
    """`ca_file = "ca.pem"` means the ca.pem next to the config (as for password_file),
    wherever sugard is started from; show-config prints the path sugard reads."""
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tmp_path / "ca.pem")
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\nca_file = "ca.pem"\n')
    result = subprocess.run(
        [SUGARD, "check", "--unit", "none", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PW": "x"},
        cwd="/",
        check=False,
    )
    assert (0, "") == (result.returncode, result.stderr)
    shown = subprocess.run(
        [SUGARD, "show-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        check=True,
    )
    assert f'ca_file = "{tmp_path / "ca.pem"}"' in shown.stdout.splitlines()


def test_warnings_do_not_fail_the_check(tmp_path: Path) -> None:
    """Risky but working settings are warned about; the exit status stays 0."""
    path = config_file(
        tmp_path,
        '[instances.prod]\nurl = "http://crm.example.com"\nusername = "api"\n'
        'password_env = "PW"\nplatform = "base"\nverify_tls = false\n',
    )
    result = check("-c", str(path), env={"PW": "x"})
    assert 0 == result.returncode, result.stderr
    warnings = result.stderr.splitlines()
    assert [
        f"{path}: instances.prod.platform: warning: 'base' is one of Sugar's own platforms: "
        "each login of sugard logs api out of it everywhere else (one session per user and "
        "platform); register a platform for sugard, like sugard",
        f"{path}: instances.prod.url: warning: http:// sends the password unencrypted; "
        "use https://",
        f"{path}: instances.prod.verify_tls: warning: TLS verification is off, so anyone on "
        "the way can pose as the site and read the password; set ca_file for a private CA "
        "instead",
    ] == warnings


def test_check_resolves_every_secret_without_printing_one(tmp_path: Path) -> None:
    """Every source is read (a failing one is named) and no secret value reaches the output."""
    secret_file(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "c.pw").write_text("s3cret-from-credential")
    path = config_file(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\n'
        '[instances.inline]\nusername = "u1"\npassword = "s3cret-inline"\n'
        '[instances.file]\nusername = "u2"\npassword_file = "pw"\n'
        '[instances.env]\nusername = "u3"\npassword_env = "PW"\n'
        '[instances.cmd]\nusername = "u4"\npassword_command = ["printf", "s3cret-from-command"]\n'
        '[instances.cred]\nusername = "u5"\npassword_credential = "c.pw"\n'
        '[instances.broken]\nusername = "u6"\n'
        'password_command = "echo s3cret-on-stderr >&2; exit 7"\n',
    )
    result = check(
        "-c", str(path), env={"PW": "s3cret-from-env", "CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert 1 == result.returncode
    assert f"{path}: instances.broken.password_command: command exited with status 7\n" == (
        result.stderr
    )
    assert "s3cret" not in result.stdout + result.stderr


def test_config_example_is_valid(tmp_path: Path) -> None:
    """config.example.toml passes `sugard check` once its placeholder secrets are supplied."""
    example = tmp_path / "config.toml"
    shutil.copy(REPO / "config.example.toml", example)
    example.chmod(0o600)  # as the file says to install it; a checkout's mode depends on umask
    env = {"SUGAR_PROD_PASSWORD": "p1", "SUGAR_STAGING_PASSWORD": "p2"}
    result = check("-c", str(example), env=env)
    assert (0, f"{example}: ok (2 instance(s): prod, staging)\n", "") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )
    without = check("-c", str(example), env={**env, "SUGAR_PROD_PASSWORD": ""})
    assert 1 == without.returncode
    assert (
        f"{example}: instances.prod.password_env: environment variable SUGAR_PROD_PASSWORD "
        "is empty\n"
    ) == without.stderr


def test_online_asks_the_running_daemon_and_never_logs_in(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """--online reports each instance's state from the daemon; Sugar sees no login from check."""
    config = write_config(
        short_dir,
        {
            "prod": instance(fake),
            "bad": instance(fake, username="admin", password="wrong-password"),
        },
    )
    daemon = start_daemon(config)
    result = check("-c", str(config), "--online", "--socket", str(daemon.socket))
    logins = fake.calls["password"]
    assert 1 == result.returncode
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"{config}: ok (2 instance(s): prod, bad)",
        f"the running daemon on {daemon.socket}:",
    ]
    assert lines[2].startswith("  prod: ready (token expires 20")
    (problem,) = result.stderr.splitlines()
    assert problem.startswith(
        f"{config}: instances.bad: the daemon needs you to fix something (failed): "
    )
    assert "rejected the credentials" in problem
    assert "wrong-password" not in result.stdout + result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    again = check("-c", str(config), "--online", "--socket", str(daemon.socket))
    assert result.stdout == again.stdout
    assert logins == fake.calls["password"]
    assert 2 == logins  # one per instance, both by the daemon


def test_online_names_instances_the_daemon_does_not_serve(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """An instance added to the file but not loaded says to run `sugarctl reload`."""
    running = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(running)
    edited = write_config(
        short_dir,
        {"prod": instance(fake, platform="scripts"), "new": instance(fake)},
        name="edited.toml",
    )
    result = check("-c", str(edited), "--online", "--socket", str(daemon.socket))
    assert 1 == result.returncode
    assert [
        f"{edited}: instances.prod: the daemon uses platform 'sugard': it runs another config, "
        "or this one is not loaded yet (sugarctl reload)",
        f"{edited}: instances.new: the daemon does not serve it; load this config with: "
        "sugarctl reload",
    ] == result.stderr.splitlines()


def test_online_without_a_daemon_exits_4(tmp_path: Path) -> None:
    """No daemon on the socket: exit 4, saying how to start one."""
    path = config_file(tmp_path, GOOD + 'password_env = "PW"\n')
    result = check(
        "-c", str(path), "--online", "--socket", str(tmp_path / "none.sock"), env={"PW": "x"}
    )
    assert 4 == result.returncode
    assert result.stderr.startswith(f"sugard check: sugard is not running on {tmp_path}")
    assert "sugard run" in result.stderr


def test_online_help_says_why_check_does_not_log_in() -> None:
    """The help of --online explains that a login of its own would log the daemon out."""
    result = subprocess.run(
        [SUGARD, "check", "--help"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "would log the daemon out" in " ".join(result.stdout.split())


DOCS = REPO / "docs" / "configuration.md"
DOC_DIR = "/home/you/.config/sugard"


def doc_examples() -> list[tuple[str | None, list[str]]]:
    """(config, console lines) of every example under "Common mistakes" in the docs."""
    text = DOCS.read_text()
    section = text.split("\n## Common mistakes\n", 1)[1].split("\n## ", 1)[0]
    examples: list[tuple[str | None, list[str]]] = []
    config: str | None = None
    for block in section.split("```")[1::2]:
        kind, _, body = block.partition("\n")
        if kind == "toml":
            config = body
        elif kind == "console":
            examples.append((config, body.splitlines()))
            config = None
    return examples


@pytest.mark.slow
def test_common_mistakes_in_the_docs_print_what_the_docs_say(tmp_path: Path) -> None:
    """Every "common mistake" in docs/configuration.md makes `sugard check` print those lines."""
    examples = doc_examples()
    assert len(examples) >= 15
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SUGARD_CONFIG", "SUGAR_PROD_PASSWORD", "CREDENTIALS_DIRECTORY")
    }
    for number, (config, console) in enumerate(examples):
        directory = tmp_path / str(number)
        directory.mkdir()
        secret_file(directory, "prod.password")
        if config is not None:
            config_file(directory, config)
        expected: list[str] = []
        for line in (line.replace(DOC_DIR, str(directory)) for line in console):
            if line.startswith("$ chmod "):
                _, _, mode, target = line.split()
                Path(target).chmod(int(mode, 8))
            elif line.startswith("$ "):
                assert "$ sugard check" == line
            else:
                expected.append(line)
        result = subprocess.run(
            [SUGARD, "check", "--unit", "none", "-c", str(directory / "config.toml")],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert expected == result.stderr.splitlines() + result.stdout.splitlines(), console


def test_every_problem_in_one_pass(tmp_path: Path) -> None:
    """Types, unknown keys, secrets, file modes and duplicates in one run: a wrong type does
    not hide a missing or loose secret file, nor a key's problem in another instance."""
    loose = secret_file(tmp_path, "loose.pw", mode=0o644)
    path = config_file(
        tmp_path,
        '[defaults]\nurl = "https://crm.example.com"\ntimeout = "10"\n'
        '[instances.a]\nusername = "a"\npassword_file = "missing.pw"\nrefresh_befor = 60\n'
        '[instances.b]\nusername = "b"\npassword_file = "loose.pw"\nverify_tls = "yes"\n'
        '[instances.c]\nusername = "b"\npassword = "inline-pw"\n',
        mode=0o640,
    )
    result = check("-c", str(path))
    assert 1 == result.returncode
    assert [
        f"{path}: defaults.timeout: must be a number, not a string; write 10 without quotes",
        f"{path}: instances.a.refresh_befor: unknown key (did you mean refresh_before?)",
        f"{path}: instances.b.verify_tls: must be true or false, not a string",
        f"{path}: instances.c.platform: instances b and c log in as b at "
        "https://crm.example.com on the same platform 'sugard': Sugar keeps one session per "
        "user and platform, so each would log the other out, forever; give one a platform of "
        'its own, like platform = "sugard_c" (register it in Sugar: Admin > Configure API '
        "Platforms)",
        f"{path}: instances.c.password: holds an inline secret but the file is readable by "
        f"others (mode 0640); run: chmod 600 {path}",
        f"{path}: instances.a.password_file: file {tmp_path / 'missing.pw'} does not exist; "
        f"create it with the secret on one line (chmod 600 {tmp_path / 'missing.pw'}), or fix "
        "the path",
        f"{path}: instances.b.password_file: {loose} is readable by others (mode 0644); "
        f"run: chmod 600 {loose}",
    ] == result.stderr.splitlines()


@pytest.mark.slow
def test_two_instances_of_one_session_are_refused_everywhere(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Same site, user (in any case) and platform twice: check and run refuse, naming both
    instances; a reload to such a config is refused and the old config keeps serving."""
    twin = instance(fake, username=USER.upper(), url=fake.url + "/")
    config = write_config(short_dir, {"prod": instance(fake), "twin": twin}, name="twins.toml")
    expected = (
        f"{config}: instances.twin.platform: instances prod and twin log in as ALICE at "
        f"{fake.url} on the same platform 'sugard': Sugar keeps one session per user and "
        "platform, so each would log the other out, forever; give one a platform of its own, "
        'like platform = "sugard_twin" (register it in Sugar: Admin > Configure API Platforms)'
    )
    checked = check("-c", str(config))
    assert (1, [expected]) == (checked.returncode, checked.stderr.splitlines())
    run = subprocess.run(
        [SUGARD, "run", "-c", str(config), "--socket", str(short_dir / "t.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (1, [expected]) == (run.returncode, run.stderr.splitlines())
    assert 0 == fake.calls["token"]

    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with daemon.client() as client:
        before = client.token("prod", wait=20)["access_token"]
    write_config(short_dir, {"prod": instance(fake), "twin": twin})
    reloaded = sugarctl(daemon.socket, "reload")
    assert 6 == reloaded.returncode
    assert expected.replace("twins.toml", "config.toml") in reloaded.stderr.splitlines()
    with daemon.client() as client:
        assert before == client.token("prod")["access_token"]
        assert ["prod"] == [s["name"] for s in client.status()]
    assert 1 == fake.calls["token"]


@pytest.mark.slow
def test_paths_the_units_sandbox_hides_are_warned_about(tmp_path: Path) -> None:
    """With the shipped unit (none installed): a secret and a ca_file under /tmp (PrivateTmp)
    and a socket in a read-only tree (ProtectSystem=strict) are warned about, exit 0; an
    installed unit's drop-in that lifts them silences them; `--unit none` too."""
    assert str(tmp_path).startswith("/tmp/")
    secret_file(tmp_path)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tmp_path / "ca.pem")
    path = config_file(
        tmp_path,
        '[daemon]\nsocket = "/srv/sugard/s.sock"\n'
        + GOOD
        + 'password_file = "pw"\nca_file = "ca.pem"\n',
    )
    xdg = tmp_path / "xdg"
    shipped = "the shipped sugard.service"
    result = check("-c", str(path), env={"XDG_CONFIG_HOME": str(xdg)}, unit=None)
    assert 0 == result.returncode, result.stderr
    assert [
        f"{path}: daemon.socket: warning: ProtectSystem=strict make /srv/sugard read-only for "
        "sugard under systemd, so it cannot create its socket there; leave socket unset "
        "(%t/sugard/sugard.sock, sugard.socket's), or add the directory to ReadWritePaths= "
        f"({shipped})",
        f"{path}: instances.prod.password_file: warning: PrivateTmp=yes gives sugard a /tmp of "
        f"its own: under systemd it cannot see {tmp_path / 'pw'}; keep it under "
        f"~/.config/sugard (or use password_credential with LoadCredential=) ({shipped})",
        f"{path}: instances.prod.ca_file: warning: PrivateTmp=yes gives sugard a /tmp of its "
        f"own: under systemd it cannot see {tmp_path / 'ca.pem'}; keep it under "
        f"~/.config/sugard (or use password_credential with LoadCredential=) ({shipped})",
    ] == result.stderr.splitlines()

    units = xdg / "systemd" / "user"
    (units / "sugard.service.d").mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "sugard.service", units / "sugard.service")
    (units / "sugard.service.d" / "paths.conf").write_text(
        "[Service]\nPrivateTmp=no\nReadWritePaths=-/srv/sugard\n"
    )
    lifted = check("-c", str(path), env={"XDG_CONFIG_HOME": str(xdg)}, unit=None)
    assert (0, "") == (lifted.returncode, lifted.stderr)
    (units / "sugard.service.d" / "paths.conf").write_text(
        "[Service]\nPrivateTmp=no\nProtectHome=yes\n"
    )
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}  # the secrets are in "home"
    hidden = check("-c", str(path), env=env, unit=None).stderr.splitlines()
    assert 3 == len(hidden)
    assert (
        f"{path}: instances.prod.password_file: warning: ProtectHome=yes hides home "
        f"directories: under systemd sugard cannot see {tmp_path / 'pw'}; use "
        "password_credential with LoadCredential=, or ProtectHome=read-only "
        f"({units / 'sugard.service'})"
    ) == hidden[1]
    silenced = check("-c", str(path))  # --unit none
    assert (0, "") == (silenced.returncode, silenced.stderr)


def test_the_built_in_sandbox_is_the_shipped_units() -> None:
    """The sandbox check falls back to a copy of systemd/sugard.service's settings: the same."""
    from dataclasses import replace

    from sugard.cli.sandbox import SHIPPED, parse_unit

    parsed = parse_unit([(REPO / "systemd" / "sugard.service").read_text()], "x")
    assert SHIPPED == replace(parsed, unit=SHIPPED.unit)


@pytest.mark.slow
def test_login_tests_a_secret_only_where_no_daemon_holds_the_session(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """--login logs in (and out) for an instance the daemon does not serve, never for one whose
    session it holds (which keeps its token) nor one it failed (no rejected password resent)."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with daemon.client() as client:
        held = client.token("prod", wait=20)["access_token"]
    edited = write_config(
        short_dir,
        {"prod": instance(fake), "ops": instance(fake, username="admin", password="admin-pw")},
        name="edited.toml",
    )
    result = check("-c", str(edited), "--login", "--socket", str(daemon.socket))
    assert "  ops: logged in as admin on 'sugard' and out again: the password works" in (
        result.stdout.splitlines()
    )
    assert (
        f"{edited}: instances.prod.password_file: warning: not tested: the daemon's instance "
        "prod holds the session of alice on platform 'sugard', and a test login would log it "
        "out; the daemon uses this password at its next password login"
    ) in result.stderr.splitlines()
    assert [("alice", 200), ("admin", 200)] == [
        (r.username, r.status) for r in fake.requests if r.grant_type == "password"
    ]
    assert 1 == fake.calls["logout"]
    assert not fake.valid(fake.issued[-1])  # the test session is gone again
    assert fake.valid(held)


def test_login_leaves_a_session_the_daemon_failed_on_to_sugarctl_refresh(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """The daemon's login was rejected: check does not send that password again itself."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, password="wrong")}))
    with daemon.client() as client:
        assert "failed" == wait_state(client, "prod", "failed")
    result = check("-c", str(daemon.config), "--login", "--socket", str(daemon.socket))
    assert (
        f"{daemon.config}: instances.prod.password_file: warning: not tested: the daemon's "
        "instance prod failed on this session; `sugarctl refresh prod` reads the password "
        "again and tries it once if it changed (a rejected one is not sent again)"
    ) in result.stderr.splitlines()
    assert 1 == fake.calls["password"]


def wait_state(client: Any, name: str, state: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while client.status(name)["state"] != state and time.monotonic() < deadline:
        time.sleep(0.05)
    return str(client.status(name)["state"])


def test_login_without_a_daemon_tests_every_instance(fake: FakeSugar, tmp_path: Path) -> None:
    """No daemon on the socket: each instance gets one login and a logout; a rejected
    password is a problem (exit 1), naming the secret's key."""
    good = write_config(tmp_path, {"prod": instance(fake)})
    none = tmp_path / "none.sock"
    ok = check("-c", str(good), "--login", "--socket", str(none))
    assert (0, "") == (ok.returncode, ok.stderr)
    assert [
        f"{good}: ok (1 instance(s): prod)",
        f"no daemon answers on {none}: each instance is tested with a login of its own",
        "  prod: logged in as alice on 'sugard' and out again: the password works",
    ] == ok.stdout.splitlines()
    bad = write_config(tmp_path, {"prod": instance(fake, password="wrong")}, name="bad.toml")
    refused = check("-c", str(bad), "--login", "--socket", str(none))
    assert 1 == refused.returncode
    assert refused.stderr.startswith(
        f"{bad}: instances.prod.password_file: test login: Sugar rejected the credentials of "
        "user 'alice' (need_login)"
    )
    assert "wrong" not in refused.stdout + refused.stderr
    assert (2, 1) == (fake.calls["password"], fake.calls["logout"])
