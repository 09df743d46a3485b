"""`sugarctl api`, `exec --proxy` and `revoke` through a real daemon against the fake SugarCRM:
the real console script, the daemon's socket proxy route, and what the fake counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import (
    SUGARCTL,
    USER,
    DaemonProcess,
    current_token,
    instance,
    sugarctl,
    write_config,
)
from support.hooks import lines, recorder
from support.nobody import AS_NOBODY, NOBODY
from support.wait import wait_for

from sugard.testing import FakeSugar
from sugard.wire import EXIT_SUGAR

ACCOUNTS = [{"name": f"Account {n:02d}", "employees": n} for n in range(1, 46)]
UPLOAD = 3 * 1024 * 1024


@pytest.fixture
def crm(start_fake: Callable[..., FakeSugar]) -> FakeSugar:
    """A fake with 45 Accounts (pages of 20) and a Note to attach files to."""
    return start_fake(records={"Accounts": ACCOUNTS, "Notes": [{"name": "the note"}]})


@pytest.fixture
def served(crm: FakeSugar, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon serving `prod` from `crm`, with a loopback listener, ready with a token."""
    hooks = short_dir / "events"
    config = write_config(
        short_dir,
        {"prod": instance(crm, listen="127.0.0.1:0", on_event=recorder(hooks))},
    )
    daemon: DaemonProcess = start_daemon(config)
    with daemon.client() as client:
        client.token("prod", wait=20)
    return daemon


def api(daemon: DaemonProcess, *args: str, input: str | None = None) -> Any:
    return sugarctl(daemon.socket, "api", "prod", *args, input=input)


def ctl(daemon: DaemonProcess) -> list[str]:
    return [SUGARCTL, "--socket", str(daemon.socket)]


def one_line(text: str) -> str:
    assert 1 == len(text.splitlines()), text
    return text.strip()


def note_id(crm: FakeSugar) -> str:
    return str(crm.records("Notes")[0]["id"])


def test_get_prints_sugars_body_through_the_proxy_route(served: DaemonProcess) -> None:
    """`api prod me` answers Sugar's body (compact, not a terminal) with exit 0, and
    `api prod` without PATH asks the same; a PATH with its own version is taken as given."""
    got = api(served, "me")
    assert (0, "") == (got.returncode, got.stderr)
    assert USER == json.loads(one_line(got.stdout))["current_user"]["user_name"]
    assert got.stdout == api(served).stdout
    for path in ("v11_20/me", "/rest/v11_20/me"):
        again = api(served, path)
        assert 0 == again.returncode, again.stderr
        assert USER == json.loads(again.stdout)["current_user"]["user_name"]


def test_typed_fields_go_in_a_json_body_or_the_query_string(
    served: DaemonProcess, crm: FakeSugar
) -> None:
    """-f is a string and -F JSON: as a JSON object body for a POST (the default with fields),
    and as a PHP query string for a GET, where a filter's list and objects arrive intact."""
    created = api(
        served, "Accounts", "-f", "name=Acme", "-F", "employees=12", "-F", "active=true",
        "-F", 'tags=["a"]', "-f", "code=007",
    )  # fmt: skip
    assert 0 == created.returncode, created.stderr
    record = crm.records("Accounts")[-1]
    assert ("Acme", 12, True, ["a"], "007") == (
        record["name"], record["employees"], record["active"], record["tags"], record["code"]
    )  # fmt: skip
    assert record["id"] == json.loads(created.stdout)["id"]
    listed = api(
        served, "Accounts", "-X", "GET", "-F", 'filter=[{"employees":{"$gt":40}}]',
        "-f", "order_by=employees:asc", "-F", "max_num=3",
    )  # fmt: skip
    assert 0 == listed.returncode, listed.stderr
    page = json.loads(listed.stdout)
    assert [41, 42, 43] == [r["employees"] for r in page["records"]]
    assert 3 == page["next_offset"]


def test_input_sends_a_file_or_stdin_as_the_body(
    served: DaemonProcess, crm: FakeSugar, tmp_path: Path
) -> None:
    """--input FILE and --input - send the bytes as they are (POST without -X), JSON by the
    file's name and by stdin's first bytes."""
    body = tmp_path / "account.json"
    body.write_text('{"name": "From a file", "employees": 3}')
    from_file = api(served, "Accounts", "--input", str(body))
    assert 0 == from_file.returncode, from_file.stderr
    from_stdin = api(served, "Accounts", "--input", "-", input='{"name": "From stdin"}')
    assert 0 == from_stdin.returncode, from_stdin.stderr
    names = [r["name"] for r in crm.records("Accounts")[-2:]]
    assert ["From a file", "From stdin"] == names
    assert 3 == crm.records("Accounts")[-2]["employees"]


def test_paginate_follows_next_offset_in_three_list_calls(
    served: DaemonProcess, crm: FakeSugar
) -> None:
    """45 records in pages of 20: three list calls at the fake, 45 JSON lines in order; a
    POST filter pages the same way."""
    before = crm.calls["list"]
    listed = api(served, "Accounts", "--paginate", "-f", "order_by=employees")
    assert (0, "") == (listed.returncode, listed.stderr)
    assert before + 3 == crm.calls["list"]
    assert list(range(1, 46)) == [
        json.loads(line)["employees"] for line in listed.stdout.splitlines()
    ]
    filtered = api(
        served, "Accounts/filter", "--paginate", "-X", "POST",
        "-F", 'filter=[{"employees":{"$lte":30}}]',
        "-f", "order_by=employees",
    )  # fmt: skip
    assert 0 == filtered.returncode, filtered.stderr
    assert list(range(1, 31)) == [
        json.loads(line)["employees"] for line in filtered.stdout.splitlines()
    ]
    assert 2 == crm.calls["filter"]


def test_an_error_answer_exits_with_its_own_code_and_says_why(served: DaemonProcess) -> None:
    """Sugar's 404: exit 8, one stderr line with the status, Sugar's error and error_message,
    and Sugar's body on stdout."""
    missing = api(served, "Accounts/no-such-id")
    assert EXIT_SUGAR == missing.returncode
    assert "sugarctl: Sugar answered 404 not_found: Could not find record: no-such-id in " in (
        one_line(missing.stderr)
    )
    assert "not_found" == json.loads(missing.stdout)["error"]


def test_sugards_own_failures_keep_their_exit_codes(served: DaemonProcess) -> None:
    """An unknown instance exits 3 (with or without a version in PATH), an oauth2 route that
    sugard refuses 7: sugard's answers, not Sugar's."""
    for path in ("me", "v10/me"):
        unknown = sugarctl(served.socket, "api", "nosuch", path)
        assert 3 == unknown.returncode, unknown.stderr
        assert "nosuch" in one_line(unknown.stderr)
    sudo = api(served, "oauth2/sudo/admin", "-X", "POST")
    assert 7 == sudo.returncode
    assert "sudo" in one_line(sudo.stderr)


@pytest.mark.slow
def test_a_3_mib_upload_and_download_are_byte_exact(
    served: DaemonProcess, crm: FakeSugar, tmp_path: Path
) -> None:
    """3 MiB of random bytes up with --input FILE (Content-Length) and with --input - (chunked),
    and down with -o FILE: what comes back is what went up, with the type the name gave."""
    data = os.urandom(UPLOAD)
    source = tmp_path / "data.pdf"
    source.write_bytes(data)
    field = f"Notes/{note_id(crm)}/file/filename"
    up = api(served, field, "-X", "PUT", "--input", str(source), "-f", "filename=data.pdf")
    assert 0 == up.returncode, up.stderr
    assert "application/pdf" == json.loads(up.stdout)["filename"]["content-type"]
    down = tmp_path / "down.pdf"
    got = api(served, field, "-o", str(down))
    assert (0, "", "") == (got.returncode, got.stdout, got.stderr)
    assert data == down.read_bytes()
    reversed_data = data[::-1]
    piped = subprocess.run(
        [*ctl(served), "api", "prod", field, "-X", "PUT", "--input", "-", "-f", "filename=x.bin"],
        input=reversed_data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert 0 == piped.returncode, piped.stderr
    to_stdout = subprocess.run(
        [*ctl(served), "api", "prod", field],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert 0 == to_stdout.returncode
    assert reversed_data == to_stdout.stdout


def test_an_eviction_mid_run_is_renewed_once_and_the_run_succeeds(
    crm: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Another login evicts sugard's session while --paginate runs: every page still comes
    (the proxy renews and replays on the daemon's side), after exactly one new login."""
    crm.latency["list"] = 0.5  # set before the first list call; the fake reads it per call
    daemon = start_daemon(write_config(short_dir, {"prod": instance(crm)}))
    with daemon.client() as client:
        client.token("prod", wait=20)
    logins, lists = crm.calls["password"], crm.calls["list"]
    with subprocess.Popen(
        [SUGARCTL, "--socket", str(daemon.socket), "api", "prod", "Accounts", "--paginate"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as run:
        wait_for(lambda: crm.calls["list"] > lists, "the first list call")
        crm.evict(USER, "sugard")
        out, err = run.communicate(timeout=60)
    assert (0, "") == (run.returncode, err)
    assert 45 == len(out.splitlines())
    assert logins + 1 == crm.calls["password"]
    assert lists + 4 == crm.calls["list"]  # three pages, one of them sent twice


CHILD = """
import os, sys, urllib.request
url = os.environ["SUGAR_URL"]
print("token" in "".join(k.lower() for k in os.environ if k.startswith("SUGAR_")), flush=True)
for _ in range(2):
    with urllib.request.urlopen(url + "/rest/v10/me") as answer:
        print(answer.status, answer.read().decode(), flush=True)
    sys.stdin.readline()
"""


def test_exec_proxy_gives_the_listener_and_no_token_across_an_eviction(
    served: DaemonProcess, crm: FakeSugar
) -> None:
    """`exec NAME --proxy`: SUGAR_URL is the loopback listener, no SUGAR_TOKEN (not even one
    inherited), and the child's calls keep working across an eviction."""
    with subprocess.Popen(
        [*ctl(served), "exec", "prod", "--proxy", "--", sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SUGAR_TOKEN": "inherited", "SUGAR_DOWNLOAD_TOKEN": "inherited"},
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        assert "False" == child.stdout.readline().strip()
        first = child.stdout.readline()
        logins = crm.calls["password"]
        crm.evict(USER, "sugard")
        child.stdin.write("\n")
        child.stdin.flush()
        second = child.stdout.readline()
        child.stdin.write("\n")
        child.stdin.close()
        assert 0 == child.wait(timeout=30)
    for line in (first, second):
        status, body = line.split(" ", 1)
        assert "200" == status
        assert USER == json.loads(body)["current_user"]["user_name"]
    assert logins + 1 == crm.calls["password"]


def test_exec_proxy_without_a_listener_is_a_usage_error(
    crm: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """An instance without `listen`: exit 2, one line naming the key; CMD never runs."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(crm)}))
    ran = short_dir / "ran"
    refused = sugarctl(daemon.socket, "exec", "prod", "--proxy", "--", "touch", str(ran))
    assert 2 == refused.returncode
    assert "listen" in one_line(refused.stderr)
    assert not ran.exists()


def test_revoke_kills_the_old_token_at_sugar_and_logs_in_once(
    served: DaemonProcess, crm: FakeSugar, short_dir: Path
) -> None:
    """`revoke prod`: one logout and one login at the fake, the old token dead there, the new
    one printed and served; the `revoked` event runs and the log says it."""
    old = current_token(served)
    logins, logouts = crm.calls["password"], crm.calls["logout"]
    revoked = sugarctl(served.socket, "revoke", "prod")
    assert (0, "") == (revoked.returncode, revoked.stderr)
    new = one_line(revoked.stdout)
    assert new != old
    assert not crm.valid(old)
    assert crm.valid(new)
    assert new == current_token(served)
    assert (logins + 1, logouts + 1) == (crm.calls["password"], crm.calls["logout"])
    wait_for(
        lambda: any(e.startswith("revoked prod ") for e in lines(short_dir / "events")),
        "the revoked event",
    )
    assert "revoked: ended the session of token" in served.log()
    assert old not in served.log() and new not in served.log()


def test_revoke_is_for_the_owner_only(crm: FakeSugar, short_dir: Path, start_daemon) -> None:
    """A uid allowed to use the tokens may not revoke the session: exit 7, nothing at Sugar."""
    config = write_config(short_dir, {"prod": instance(crm)}, daemon={"allowed_uids": [NOBODY]})
    daemon = start_daemon(config)
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    with daemon.client() as client:
        client.token("prod", wait=20)
    refused = subprocess.run(
        [*AS_NOBODY, SUGARCTL, "--socket", str(daemon.socket), "revoke", "prod"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 7 == refused.returncode
    assert f"uid {NOBODY} may not revoke sessions of sugard" in one_line(refused.stderr)
    assert 0 == crm.calls["logout"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["Accounts/../Users"], "PATH"),
        (["Accounts/%2e%2e/Users"], "PATH"),
        (["Accounts", "-f", "name"], "-f 'name'"),
        (["Accounts", "-F", "employees=twelve"], "-F 'employees=twelve'"),
        (["Accounts", "-o", "/no/such/folder/out.json"], "-o /no/such/folder/out.json"),
        (["Accounts", "--input", "/no/such/file"], "--input /no/such/file"),
        (["Accounts", "-H", "no colon"], "-H 'no colon'"),
        (["Accounts", "--paginate", "-X", "PUT"], "--paginate"),
    ],
)
def test_bad_input_is_a_usage_error_before_anything_is_sent(args: list[str], named: str) -> None:
    """Each bad argument: exit 2 and one line naming it, with no daemon at all (so nothing
    was sent: reaching for one would exit 4)."""
    got = sugarctl(Path("/nonexistent/sugard.sock"), "api", "prod", *args)
    assert (2, "") == (got.returncode, got.stdout)
    assert named in one_line(got.stderr)


def test_revoke_never_sends_a_rejected_password_and_ends_nothing(
    served: DaemonProcess, crm: FakeSugar
) -> None:
    """After Sugar rejected the password, `revoke` exits 6 without a logout or a login: a
    rejected password is never sent again, whoever asks."""
    crm.set_password(USER, "changed-by-the-admin")
    crm.evict(USER, "sugard")  # the refresh token dies with it: the renewal is a login
    refused = sugarctl(served.socket, "refresh", "prod")
    assert 6 == refused.returncode, refused.stderr
    logins, logouts = crm.calls["password"], crm.calls["logout"]
    revoked = sugarctl(served.socket, "revoke", "prod")
    assert 6 == revoked.returncode
    assert "not sending it again" in one_line(revoked.stderr)
    assert (logins, logouts) == (crm.calls["password"], crm.calls["logout"])
