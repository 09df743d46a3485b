"""Loading the TOML config: validation that names file, table and key; secret sources."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from support.daemon import SUGARD

from sugard.config import INSTANCE_KEYS_HELP, ConfigError, diff_configs, load_config
from sugard.secret import Secret


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    return [str(p) for p in caught.value.problems]


def test_every_problem_names_file_table_and_key(tmp_path: Path) -> None:
    """All problems are reported at once, each as `file: table.key: message`."""
    path = write(
        tmp_path,
        '[daemon]\nlog_level = "loud"\n'
        '[instances.prod]\nurl = "https://crm.example.com"\nusername = "u"\n'
        'password = "p"\ntimeout = "10"\ncolour = "blue"\n',
    )
    found = problems(path)
    assert [
        f"{path}: daemon.log_level: must be one of debug, info, warning, error, not 'loud'",
        f"{path}: instances.prod.timeout: must be a number, not a string; write 10 without quotes",
        f"{path}: instances.prod.colour: unknown key; {INSTANCE_KEYS_HELP}",
    ] == found


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    """[defaults] fills every instance; an instance's own value wins."""
    path = write(
        tmp_path,
        '[defaults]\nplatform = "scripts"\ntimeout = 5\n'
        '[instances.a]\nurl = "https://a.example.com/"\nusername = "u"\npassword = "p"\n'
        '[instances.b]\nurl = "https://b.example.com"\nusername = "u"\npassword = "p"\n'
        'platform = "other"\n',
    )
    config = load_config(path, {})
    assert "scripts" == config.instances["a"].platform
    assert "other" == config.instances["b"].platform
    assert 5.0 == config.instances["b"].timeout
    assert "https://a.example.com" == config.instances["a"].url


def test_secret_sources_resolve(tmp_path: Path) -> None:
    """password_file, password_env, password_command and password_credential all resolve."""
    secret_file = tmp_path / "p.txt"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "prod.pw").write_text("from-credential")
    path = write(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\n'
        '[instances.f]\nusername = "f"\npassword_file = "p.txt"\n'
        '[instances.e]\nusername = "e"\npassword_env = "PW"\n'
        '[instances.c]\nusername = "c"\npassword_command = "echo from-command"\n'
        '[instances.l]\nusername = "l"\npassword_credential = "prod.pw"\n',
    )
    config = load_config(path, {"PW": "from-env", "CREDENTIALS_DIRECTORY": str(creds)})
    got = {name: i.password.reveal() for name, i in config.instances.items()}
    assert {
        "f": "from-file",
        "e": "from-env",
        "c": "from-command",
        "l": "from-credential",
    } == got
    assert "***" not in got.values()
    assert "Secret('***')" == repr(config.instances["f"].password.value)
    assert "from-file" not in repr(config)


def test_missing_and_loose_secrets_are_reported(tmp_path: Path) -> None:
    """A missing env var, a failing command and a world-readable secret file each say the fix."""
    loose = tmp_path / "loose.pw"
    loose.write_text("x")
    loose.chmod(0o644)
    path = write(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\nusername = "u"\n'
        '[instances.e]\npassword_env = "NOPE"\n'
        '[instances.c]\npassword_command = "echo secret-on-stderr >&2; exit 3"\n'
        '[instances.f]\npassword_file = "loose.pw"\n',
    )
    found = problems(path)
    assert f"{path}: instances.e.password_env: environment variable NOPE is not set" in found
    assert f"{path}: instances.c.password_command: command exited with status 3" in found
    assert any(f"chmod 600 {loose}" in p for p in found)
    assert not any("secret-on-stderr" in p for p in found)


def test_two_sources_for_one_secret_is_an_error(tmp_path: Path) -> None:
    """A secret comes from exactly one source."""
    path = write(
        tmp_path,
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\n'
        'password = "p"\npassword_env = "X"\n',
    )
    assert [f"{path}: instances.a.password_env: give only one of password, password_env"] == (
        problems(path)
    )


def test_bad_instance_name_and_platform(tmp_path: Path) -> None:
    """Instance names and platforms follow Sugar's and the design's patterns."""
    path = write(
        tmp_path,
        '[instances."-bad"]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        '[instances.ok]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        'platform = "Not Valid"\n',
    )
    found = problems(path)
    assert 2 == len(found)
    assert found[0].startswith(f"{path}: instances.-bad: bad instance name")
    assert found[1].startswith(f"{path}: instances.ok.platform: 'Not Valid' is not a valid")


def test_diff_sees_secret_changes(tmp_path: Path) -> None:
    """A changed password counts as a change even when its source is the same."""
    secret = tmp_path / "pw"
    secret.write_text("one")
    secret.chmod(0o600)
    text = '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword_file = "pw"\n'
    old = load_config(write(tmp_path, text), {})
    secret.write_text("two")
    new = load_config(write(tmp_path, text), {})
    assert ("a",) == diff_configs(old, new).changed
    assert Secret("one") != Secret("two")


@pytest.mark.slow
def test_sugard_check_exit_codes(tmp_path: Path) -> None:
    """`sugard check` exits 0 on a good config and 1 with the problems on stderr."""
    good = write(
        tmp_path, '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
    )
    ok = subprocess.run(
        [SUGARD, "check", "-c", str(good)], capture_output=True, text=True, check=False
    )
    assert 0 == ok.returncode
    assert "ok (1 instance(s): a)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[instances.a]\nurl = 3\n")
    result = subprocess.run(
        [SUGARD, "check", "-c", str(bad)], capture_output=True, text=True, check=False
    )
    assert 1 == result.returncode
    assert [
        f"{bad}: instances.a.url: must be a string, not an integer",
        f"{bad}: instances.a.username: missing; every instance needs url and username",
        f"{bad}: instances.a.password_file: missing; give the password as one of "
        "password_file, password_env, password_command, password_credential or password",
    ] == result.stderr.splitlines()


def test_misspelt_keys_and_tables_get_a_suggestion(tmp_path: Path) -> None:
    """A near miss of a known key or table names the one that was meant."""
    path = write(
        tmp_path,
        '[daemon]\nlog_levl = "info"\n[instance.x]\nurl = "https://a.example.com"\n'
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        'verify_tsl = true\npasword_file = "x"\n',
    )
    assert [
        f"{path}: instance: unknown table or key (did you mean instances?); "
        "expected [daemon], [defaults] and [instances.NAME]",
        f"{path}: daemon.log_levl: unknown key (did you mean log_level?); [daemon] keys are "
        "socket, log_level, max_parallel_logins, shutdown_grace, allowed_uids, allowed_gids, "
        "metrics_listen",
        f"{path}: instances.a.verify_tsl: unknown key (did you mean verify_tls?)",
        f"{path}: instances.a.pasword_file: unknown key (did you mean password_file?)",
    ] == problems(path)


def test_quoted_booleans_and_integers_say_to_drop_the_quotes(tmp_path: Path) -> None:
    """`"true"` and `"4"` are strings in TOML; the message shows the unquoted spelling."""
    path = write(
        tmp_path,
        '[daemon]\nmax_parallel_logins = "4"\n[defaults]\nverify_tls = "true"\n'
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n',
    )
    assert [
        f"{path}: daemon.max_parallel_logins: must be an integer, not a string; "
        "write 4 without quotes",
        f"{path}: defaults.verify_tls: must be true or false, not a string; "
        "write true without quotes",
    ] == problems(path)


def test_instance_keys_at_the_instances_level_are_explained(tmp_path: Path) -> None:
    """`url` right under [instances] is not an instance; the message shows the table form."""
    path = write(tmp_path, '[instances]\nurl = "https://a.example.com"\n')
    assert [
        f"{path}: instances.url: must be a table, not a string; each instance is a table of "
        "its own: [instances.NAME]"
    ] == problems(path)


def test_a_bad_secret_in_defaults_is_reported_once(tmp_path: Path) -> None:
    """A broken [defaults] secret is one problem, not one per instance nor a `missing` one."""
    path = write(
        tmp_path,
        '[defaults]\npassword_env = 3\nusername = "u"\n'
        '[instances.a]\nurl = "https://a.example.com"\n'
        '[instances.b]\nurl = "https://b.example.com"\n',
    )
    assert [f"{path}: defaults.password_env: must be a string, not an integer"] == problems(path)


def test_missing_credential_names_the_unit_setting(tmp_path: Path) -> None:
    """A password_credential not in $CREDENTIALS_DIRECTORY points at LoadCredential=."""
    path = write(
        tmp_path,
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\n'
        'password_credential = "a.pw"\n',
    )
    assert [
        f"{path}: instances.a.password_credential: credential a.pw is not in "
        f"$CREDENTIALS_DIRECTORY ({tmp_path}); check LoadCredential= in the systemd unit"
    ] == problems(path, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


SECRETS = {
    "inline": "s3cret-inline-pw",
    "client": "s3cret-inline-client",
    "file": "s3cret-in-file",
    "env": "s3cret-in-env",
    "cred": "s3cret-in-credential",
}


def every_source_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    secret = tmp_path / "f.pw"
    secret.write_text(SECRETS["file"])
    secret.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "c.pw").write_text(SECRETS["cred"])
    marker = tmp_path / "command-ran"
    path = write(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\nusername = "u"\nplatform = "scripts"\n'
        f'[instances.inline]\npassword = "{SECRETS["inline"]}"\nclient_id = "etl"\n'
        f'client_secret = "{SECRETS["client"]}"\n'
        '[instances.file]\nusername = "u-file"\npassword_file = "f.pw"\nclient_secret_env = "CS"\n'
        '[instances.env]\nusername = "u-env"\npassword_env = "PW"\ntimeout = 3\n'
        '[instances.cmd]\nusername = "u-cmd"\n'
        f'password_command = ["sh", "-c", "touch {marker}; echo x"]\n'
        '[instances.cred]\nusername = "u-cred"\npassword_credential = "c.pw"\n',
    )
    env = {
        **os.environ,
        "PW": SECRETS["env"],
        "CS": SECRETS["client"],
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    return path, env


def show_config(path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SUGARD, "show-config", "-c", str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_show_config_never_prints_a_secret(tmp_path: Path) -> None:
    """TOML and JSON output carry `***` and each secret's source, never a value; no command runs."""
    path, env = every_source_config(tmp_path)
    for args in ((), ("--json",)):
        result = show_config(path, env, *args)
        assert 0 == result.returncode, result.stderr
        for value in SECRETS.values():
            assert value not in result.stdout + result.stderr
        assert "s3cret" not in result.stdout + result.stderr
    assert not (tmp_path / "command-ran").exists()


def test_show_config_merges_defaults_and_names_secret_sources(tmp_path: Path) -> None:
    """Each instance shows the merged values; each secret shows where it comes from."""
    path, env = every_source_config(tmp_path)
    result = show_config(path, env)
    assert result.stdout.startswith(f"# {path} as sugard uses it")
    data = tomllib.loads(result.stdout)
    assert data == json.loads(show_config(path, env, "--json").stdout)
    instances = data["instances"]
    assert {
        "inline": "*** (inline)",
        "file": f"*** (file: {tmp_path / 'f.pw'})",
        "env": "*** (env: PW)",
        "cmd": f"*** (command: sh -c 'touch {tmp_path / 'command-ran'}; echo x')",
        "cred": "*** (credential: c.pw)",
    } == {name: table["password"] for name, table in instances.items()}
    assert "*** (inline)" == instances["inline"]["client_secret"]
    assert "*** (env: CS)" == instances["file"]["client_secret"]
    assert "(empty)" == instances["env"]["client_secret"]
    assert {"scripts"} == {table["platform"] for table in instances.values()}
    assert "u" == instances["inline"]["username"]
    assert "u-env" == instances["env"]["username"]
    assert 3.0 == instances["env"]["timeout"]
    assert 10.0 == instances["cmd"]["timeout"]
    assert "etl" == instances["inline"]["client_id"]
    assert "sugar" == instances["env"]["client_id"]
    assert {"log_level": "info", "max_parallel_logins": 4, "shutdown_grace": 10.0} == {
        k: v for k, v in data["daemon"].items() if k != "socket"
    }


def test_show_config_reports_the_socket_sugard_run_would_use(tmp_path: Path) -> None:
    """With no [daemon].socket, the effective socket is the runtime default."""
    path = write(
        tmp_path,
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword_env = "PW"\n',
    )
    env = {k: v for k, v in os.environ.items() if k != "SUGARD_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    result = show_config(path, env, "--json")
    assert (
        str(tmp_path / "run" / "sugard" / "sugard.sock")
        == json.loads(result.stdout)["daemon"]["socket"]
    )


def test_show_config_of_a_broken_file_prints_the_problems(tmp_path: Path) -> None:
    """A config with problems prints them as check does, exit 1, nothing on stdout."""
    path = write(tmp_path, '[instances.a]\nurl = 3\nusername = "u"\npassword_env = "PW"\n')
    result = show_config(path, dict(os.environ))
    assert (1, "", f"{path}: instances.a.url: must be a string, not an integer\n") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )


def test_a_name_with_a_trailing_newline_is_refused_on_one_line(tmp_path: Path) -> None:
    """`[instances."prod\\n"]` (which `$` alone would let through) is a bad instance name,
    shown quoted on one line; a platform or url with a newline is refused the same way."""
    path = write(
        tmp_path,
        '[instances."prod\\n"]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        '[instances.ok]\nurl = "https://a.example.com\\n"\nusername = "u"\npassword = "p"\n'
        'platform = "sugard\\n"\n"bad\\tkey" = 1\n',
    )
    assert [
        f'{path}: instances."prod\\n": bad instance name: use up to 64 of A-Z, a-z, 0-9, '
        "'_', '.' and '-', starting with a letter or digit",
        f"{path}: instances.ok.url: must not contain spaces or control characters, "
        "not 'https://a.example.com\\n'",
        f"{path}: instances.ok.platform: 'sugard\\n' is not a valid platform name: use 1-127 "
        "of a-z, 0-9, '_' and '-', like 'sugard' (and register it in Sugar: Admin > "
        "Configure API Platforms)",
        f'{path}: instances.ok."bad\\tkey": unknown key; {INSTANCE_KEYS_HELP}',
    ] == problems(path)
    result = subprocess.run(
        [SUGARD, "check", "-c", str(path)], capture_output=True, text=True, check=False
    )
    assert 1 == result.returncode
    assert 4 == len(result.stderr.splitlines())
    init = subprocess.run(
        [
            *(SUGARD, "init", "-c", str(tmp_path / "new.toml"), "--instance", "prod\n"),
            *("--url", "https://a.example.com", "--username", "u", "--password-env", "PW"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (2, "") == (init.returncode, init.stdout)
    assert 1 == len(init.stderr.splitlines())
    assert "'prod\\n' is not a valid instance name" in init.stderr
    assert not (tmp_path / "new.toml").exists()


@pytest.mark.parametrize(
    "url",
    [
        "https://api:pw-in-url-9@crm.example.com",
        "https://pw-in-url-9@crm.example.com/sugar",
        "api:pw-in-url-9@crm.example.com",
        "https://api:pw-in-url-9@crm.example.com with a space",
    ],
)
def test_a_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    """A site URL holding user:password@ is refused for its key, and the password is never
    quoted, whatever else is wrong with the URL."""
    path = write(tmp_path, f'[instances.prod]\nurl = "{url}"\nusername = "u"\npassword = "p"\n')
    found = problems(path)
    assert 1 == len(found), found
    assert found[0].startswith(f"{path}: instances.prod.url: must not hold a user name")
    assert "pw-in-url-9" not in found[0]


def test_api_version_defaults_to_v10_and_is_checked(tmp_path: Path) -> None:
    """api_version is v10 unless set (in [defaults] or the instance), show-config shows it, and
    a value Sugar's paths do not name is a problem naming the key."""
    path = write(
        tmp_path,
        '[defaults]\napi_version = "v11_20"\n'
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        '[instances.b]\nurl = "https://b.example.com"\nusername = "u"\npassword = "p"\n'
        'api_version = "v10"\n',
    )
    config = load_config(path, {})
    assert ("v11_20", "v10") == (
        config.instances["a"].api_version,
        config.instances["b"].api_version,
    )
    shown = tomllib.loads(show_config(path, {}).stdout)["instances"]
    assert "v11_20" == shown["a"]["api_version"]
    bad = write(
        tmp_path,
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        'api_version = "10"\n',
    )
    (problem,) = problems(bad)
    assert problem.startswith(f"{bad}: instances.a.api_version: must be a version of Sugar's")
    assert "'10'" in problem


def test_a_toml_syntax_error_says_what_to_do_and_never_echoes_the_value(tmp_path: Path) -> None:
    """An unquoted string says to quote it (naming the key, not the value: it may be a
    password), `True` says lower case, an unclosed string and a key given twice say so."""
    head = '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\n'
    cases = {
        "password = hunter2-secret\n": (
            'Invalid value (at line 4, column 12); a string must be in quotes: password = "..."'
        ),
        "verify_tls = True\n": "; true and false are written in lower case",
        'password = "unclosed\n': "; a string must end on the line it starts",
        'username = "v"\n': "; username is set twice: keep one",
    }
    for line, said in cases.items():
        [problem] = problems(write(tmp_path, head + line))
        assert problem.startswith(f"{tmp_path / 'config.toml'}: invalid TOML: "), problem
        assert said in problem, problem
        assert "hunter2" not in problem and "unclosed" not in problem
