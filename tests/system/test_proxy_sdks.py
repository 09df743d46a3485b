# Expected value first in asserts (docs/style.md), which ruff's SIM300 calls a Yoda condition.
"""The Sugar SDKs people script with, unmodified, through sugard's proxy.

pysugarcrm, zucker (its requests-based sync client) and sugarcrm-25-api are pointed at an
instance's loopback listener, exactly as tests/test_third_party_clients.py points them at the
fake: each logs in (answered by sugard), creates, filters, reads and counts records and logs out
(answered by sugard), and sugard's session is the one it was before. Then an eviction in the
middle of each run, which the client never sees; then requests, httpx, aiohttp and curl against
the fake's record routes, and the proxy's way out through an outbound HTTP proxy.

The fake registers none of the SDKs' own platforms (api, zucker, scripts): a login of theirs
that reached it would be refused with 422, on top of showing in `fake.requests`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from pysugarcrm import sugar_api
from support import ROOT
from support.daemon import (
    PASSWORD,
    USER,
    DaemonProcess,
    current_token,
    instance,
    proxy_url,
    write_config,
)
from support.forward_proxy import running_proxy
from support.sdks import pysugarcrm_workload, run_python
from zucker import RequestsClient, model

from sugard.testing import FakeSugar, running_fake

# No proxy variable leaks in from the runner: each test sets the daemon's own.
pytestmark = pytest.mark.usefixtures("no_proxy_of_our_own")

ANSWERED_LOGIN = "answered a client's login"
DOCS = ROOT / "docs" / "proxy.md"
DOC_SITE = "http://127.0.0.1:8401"  # the listener docs/proxy.md's examples are written for


@pytest.fixture
def site() -> Iterator[FakeSugar]:
    """The fake with alice and one account; only the built-in platforms (sugard's among them)."""
    with running_fake(
        users={USER: PASSWORD}, records={"Accounts": [{"name": "Zeta Ltd", "rank": 1}]}
    ) as server:
        yield server


@pytest.fixture
def proxied(site: FakeSugar, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon with instance `prod` on `site`, its proxy on a loopback port, logged in."""
    daemon: DaemonProcess = start_daemon(
        write_config(short_dir, {"prod": instance(site, listen="127.0.0.1:0")})
    )
    with daemon.client() as client:
        client.token("prod", wait=20)
    return daemon


def listener(daemon: DaemonProcess) -> str:
    url = proxy_url(daemon)
    assert url.startswith("http://127.0.0.1:")
    return url


class Session:
    """sugard's session before a client's run, to compare with after it."""

    def __init__(self, daemon: DaemonProcess, site: FakeSugar) -> None:
        self.daemon, self.site = daemon, site
        self.token = current_token(daemon)
        self.answered = daemon.log().count(ANSWERED_LOGIN)
        site.reset_counters()

    def logins_answered(self) -> int:
        """How many logins the clients sent since, all answered by sugard."""
        return self.daemon.log().count(ANSWERED_LOGIN) - self.answered

    def assert_untouched(self) -> None:
        """The same token, still valid, and the fake saw no login and no logout at all."""
        assert self.token == current_token(self.daemon)
        assert self.site.valid(self.token)
        assert [] == self.site.requests
        assert (0, 0) == (self.site.calls["token"], self.site.calls["logout"])

    def assert_one_renewal(self, intruder: bool = False) -> None:
        """The eviction cost sugard one renewal: its refresh, which the eviction had killed
        too, then one password login; nothing else reached the token endpoint but the
        `intruder`'s login that evicted it, if that is how it was evicted."""
        assert [("password", 200)] * intruder + [("refresh_token", 400), ("password", 200)] == [
            (r.grant_type, r.status) for r in self.site.requests
        ]
        assert {"sugard"} == {r.platform for r in self.site.requests}
        assert 0 == self.site.calls["logout"]
        assert self.token != current_token(self.daemon)


# ---------------------------------------------------------------- pysugarcrm 1.0.3


def test_pysugarcrm_through_the_listener(proxied: DaemonProcess, site: FakeSugar) -> None:
    """pysugarcrm logs in (sugard answers with its token), creates, filters, reads and counts;
    leaving `sugar_api` logs out, which sugard answers: the session is untouched."""
    session = Session(proxied, site)
    with sugar_api(listener(proxied), "anyone", "any-password") as crm:
        assert session.token == crm.secret_token
        pysugarcrm_workload(crm)
    assert crm.is_closed
    assert (1, 1, 1) == (site.calls["create"], site.calls["filter"], site.calls["read"])
    assert 1 == session.logins_answered()
    session.assert_untouched()


def test_pysugarcrm_never_sees_an_eviction(proxied: DaemonProcess, site: FakeSugar) -> None:
    """Sugar evicts sugard's session between two calls: pysugarcrm's next POST (a JSON body)
    is answered 200 after one renewal, sent to Sugar twice and created once."""
    session = Session(proxied, site)
    with sugar_api(listener(proxied), "anyone", "any-password") as crm:
        assert 1 == len(crm.get("/Accounts")["records"])
        assert 1 == site.evict(USER, "sugard")
        created = crm.post("/Accounts", data=json.dumps({"name": "Acme", "rank": 2}))
        assert "Acme" == created["name"]
        assert 2 == crm.get("/Accounts/count")["record_count"]
    assert 2 == site.calls["create"]  # refused once (401), replayed once
    assert ["Acme"] == [r["name"] for r in site.records("Accounts") if r["name"] == "Acme"]
    assert 1 == session.logins_answered()
    session.assert_one_renewal()


# ---------------------------------------------------------------- zucker 0.2.7 (sync)


def zucker_accounts(url: str) -> tuple[RequestsClient, type[model.SyncModule]]:
    """zucker's sync client on `url` and an Accounts model bound to it."""
    client = RequestsClient(url, "anyone", "any-password")

    class Account(model.SyncModule, client=client, api_name="Accounts"):
        name = model.StringField()
        rank = model.IntegerField()

    return client, Account


def test_zucker_through_the_listener(proxied: DaemonProcess, site: FakeSugar) -> None:
    """zucker logs in at oauth2/token/ (sugard answers), fetches metadata, saves, finds, counts,
    reads by id, updates; its logout is answered too: the session is untouched."""
    session = Session(proxied, site)
    client, account = zucker_accounts(listener(proxied))
    client.fetch_metadata("server_info", "full_module_list")
    assert "Accounts" in client
    acme = account(name="Acme Corp", rank=3)
    acme.save()
    assert acme.id is not None
    assert ["Acme Corp"] == [r.name for r in account.find(account.name.starts_with("acme"))]
    assert 2 == len(account.find())
    assert "Acme Corp" == account.get_by_id(str(acme.id)).name
    acme.name = "Acme Inc"
    acme.save()
    acme.refresh()
    assert "Acme Inc" == site.records("Accounts")[1]["name"] == acme.name
    assert session.token == client._authentication[1]  # zucker keeps its token there
    assert {"success": True} == client.request("post", "oauth2/logout")
    assert (1, 1) == (site.calls["create"], site.calls["update"])
    assert 1 == session.logins_answered()
    session.assert_untouched()


def test_zucker_never_sees_an_eviction(proxied: DaemonProcess, site: FakeSugar) -> None:
    """Another script logs in at Sugar itself as sugard's user and platform between zucker's
    calls: zucker's next save (a JSON POST) succeeds after one renewal, sent twice, created
    once; zucker never logs in again."""
    session = Session(proxied, site)
    _client, account = zucker_accounts(listener(proxied))
    assert 1 == len(account.find())
    intruder = requests.post(
        f"{site.url}/rest/v10/oauth2/token",
        json={
            "grant_type": "password",
            "client_id": "sugar",
            "username": USER,
            "password": PASSWORD,
            "platform": "sugard",
        },
        timeout=30,
    )
    assert 200 == intruder.status_code
    acme = account(name="Acme Corp", rank=3)
    acme.save()
    assert acme.id is not None
    assert 2 == len(account.find())
    assert 2 == site.calls["create"]
    assert ["Zeta Ltd", "Acme Corp"] == [r["name"] for r in site.records("Accounts")]
    assert 1 == session.logins_answered()
    session.assert_one_renewal(intruder=True)


# ---------------------------------------------------------------- sugarcrm-25-api 0.1.1

# The library reads .env and caches its token in the working directory when it is imported,
# so it runs as its users run it: a script in a directory of its own. Between its first calls
# and its create it waits for a line on stdin, while the test evicts the session (or not).
SCRIPT_25 = textwrap.dedent(
    """
    import json
    import sys
    import sugarcrm_25_api as sugar

    out = {"ping": sugar.ping(), "modules": sugar.modules()}
    print("waiting", flush=True)
    sys.stdin.readline()
    created = sugar.create_record("Contacts", {"first_name": "Ana", "last_name": "Rodriguez"})
    out["created"] = created
    out["hits"] = sugar.list_records("Contacts", {"last_name": "rodriguez"}, fields=["last_name"])
    out["read"] = sugar.get_record("Contacts", created["id"])
    out["count"] = sugar.raw("GET", "Contacts/count")
    out["uploaded"] = sugar.upload("notes.txt", module="Notes")
    out["logout"] = sugar.raw("POST", "oauth2/logout")
    print(json.dumps(out))
    """
)


def run_25_api(url: str, directory: Path, between: Any) -> dict[str, Any]:
    """SCRIPT_25 against `url`; `between()` runs while the script waits."""
    (directory / ".env").write_text(
        f"SUGAR_URL={url}\nSUGAR_PLATFORM=scripts\nSUGAR_USERNAME=anyone\nSUGAR_PASSWORD=any\n"
    )
    (directory / "notes.txt").write_bytes(b"call notes\n")
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT_25],
        cwd=directory,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as script:
        assert script.stdout is not None and script.stdin is not None
        line = script.stdout.readline()
        assert "waiting\n" == line, script.stderr.read() if script.stderr else line
        between()
        stdout, stderr = script.communicate("go\n", timeout=60)
    assert 0 == script.returncode, stderr
    out: dict[str, Any] = json.loads(stdout)
    return out


def check_25_api_run(out: dict[str, Any], site: FakeSugar) -> None:
    assert {"ping": "pong", "user": USER} == out["ping"]
    created = out["created"]
    assert [created["id"]] == [r["id"] for r in out["hits"]["records"]]
    assert created == out["read"]
    assert {"record_count": 1} == out["count"]
    note = site.records("Notes")[0]
    assert (out["uploaded"]["id"], "notes.txt") == (note["id"], note["filename"])
    assert {"success": True} == out["logout"]


@pytest.mark.slow
def test_sugarcrm_25_api_through_the_listener(
    proxied: DaemonProcess, site: FakeSugar, tmp_path: Path
) -> None:
    """sugarcrm-25-api: ping, modules, create, filter, read, count, a multipart upload and its
    logout, all through the listener; its token cache holds no Sugar refresh token."""
    session = Session(proxied, site)
    out = run_25_api(listener(proxied), tmp_path, lambda: None)
    check_25_api_run(out, site)
    assert 1 == session.logins_answered()
    session.assert_untouched()
    cached = json.loads((tmp_path / ".sugar_token.json").read_text())
    assert session.token == cached["access_token"]
    assert cached["refresh_token"] not in site.issued


@pytest.mark.slow
def test_sugarcrm_25_api_never_sees_an_eviction(
    proxied: DaemonProcess, site: FakeSugar, tmp_path: Path
) -> None:
    """An eviction while the script waits: its create (a JSON POST) is answered after one
    renewal, sent twice and created once, and the script never logs in again (its own 401
    handling would have)."""
    session = Session(proxied, site)
    out = run_25_api(listener(proxied), tmp_path, lambda: site.evict(USER, "sugard"))
    check_25_api_run(out, site)
    assert 2 + 1 == site.calls["create"]  # the contact refused and replayed; the note's
    assert 1 == len(site.records("Contacts"))
    assert 1 == session.logins_answered()
    session.assert_one_renewal()


# ---------------------------------------------------------------- plain HTTP clients


def test_requests_over_the_listener_creates_and_filters(
    proxied: DaemonProcess, site: FakeSugar
) -> None:
    """requests (which has no Unix-socket transport of its own) over the listener: a create, a
    filter and a count, with no token of its own."""
    session = Session(proxied, site)
    api = listener(proxied) + "/rest/v11_24"
    with requests.Session() as sugar:
        created = sugar.post(f"{api}/Accounts", json={"name": "Acme"}, timeout=30).json()
        hits = sugar.post(
            f"{api}/Accounts/filter", json={"filter": [{"name": {"$starts": "ac"}}]}, timeout=30
        ).json()
        count = sugar.get(f"{api}/Accounts/count", timeout=30).json()
    assert [created["id"]] == [r["id"] for r in hits["records"]]
    assert {"record_count": 2} == count
    session.assert_untouched()


def test_httpx_aiohttp_and_curl_over_the_socket_reach_the_records(
    proxied: DaemonProcess, site: FakeSugar
) -> None:
    """httpx (uds transport), aiohttp (UnixConnector) and curl --unix-socket on the socket form
    of the site root create, filter, read and count records."""
    session = Session(proxied, site)
    root = "http://sugard/v1/instances/prod/rest/v11_24"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(proxied.socket))) as sugar:
        made = sugar.post(f"{root}/Accounts", json={"name": "Via httpx"}).json()
        assert made == sugar.get(f"{root}/Accounts/{made['id']}").json()

    async def with_aiohttp() -> dict[str, Any]:
        connector = aiohttp.UnixConnector(path=str(proxied.socket))
        async with aiohttp.ClientSession(connector=connector) as sugar:
            async with sugar.post(f"{root}/Accounts", json={"name": "Via aiohttp"}) as answer:
                assert 200 == answer.status
            async with sugar.post(
                f"{root}/Accounts/filter", json={"filter": [{"name": {"$starts": "via"}}]}
            ) as answer:
                hits: dict[str, Any] = await answer.json()
                return hits

    hits = asyncio.run(with_aiohttp())
    assert {"Via httpx", "Via aiohttp"} == {r["name"] for r in hits["records"]}
    curl = subprocess.run(
        ["curl", "-sS", "--fail", "--unix-socket", str(proxied.socket), f"{root}/Accounts/count"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert {"record_count": 3} == json.loads(curl.stdout)
    session.assert_untouched()


# ---------------------------------------------------------------- the way out


def test_proxied_requests_go_through_the_daemons_outbound_proxy(
    site: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """With HTTP_PROXY in the daemon's environment, proxied requests (socket route and
    listener) reach Sugar through that proxy, as the daemon's own login does."""
    with running_proxy() as outbound:
        daemon = start_daemon(
            write_config(short_dir, {"prod": instance(site, listen="127.0.0.1:0")}),
            env={"HTTP_PROXY": outbound.url},
        )
        with daemon.client() as client:
            client.token("prod", wait=20)
        assert [f"POST {site.url}/rest/v10/oauth2/token"] == outbound.logins
        answer = requests.post(
            listener(daemon) + "/rest/v10/Accounts", json={"name": "Acme"}, timeout=30
        )
        assert 200 == answer.status_code, answer.text
        curl = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "--unix-socket",
                str(daemon.socket),
                "http://sugard/v1/instances/prod/rest/v10/Accounts/count",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert {"record_count": 2} == json.loads(curl.stdout)
        forwarded = [r for r in outbound.requests if "/oauth2/" not in r]
        assert f"POST {site.url}/rest/v10/Accounts" in forwarded
        assert f"GET {site.url}/rest/v10/Accounts/count" in forwarded
        daemon.stop()


# ---------------------------------------------------------------- docs/proxy.md's examples


def doc_blocks(heading: str, language: str = "python") -> list[str]:
    """The code blocks in `language` of one client's section of docs/proxy.md."""
    text = DOCS.read_text()
    section = text.split(f"\n### {heading}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split(f"```{language}\n")[1:]]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "printed"),
    [
        ("requests", "['Zeta Ltd']"),
        ("httpx", USER),
        ("aiohttp", USER),
        ("pysugarcrm", "Acme"),
        ("zucker", "['Acme']"),
        ("sugarcrm-25-api", USER),
    ],
)
def test_the_documented_examples_run(
    heading: str,
    printed: str,
    proxied: DaemonProcess,
    site: FakeSugar,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each Python example of docs/proxy.md runs as written (the listener's address put in for
    the documented one, SUGARD_SOCKET set as `sugarctl env` sets it), prints what it says,
    and leaves sugard's session as it was."""
    session = Session(proxied, site)
    url = listener(proxied)
    monkeypatch.setenv("SUGARD_SOCKET", str(proxied.socket))
    (code,) = doc_blocks(heading)
    if heading == "sugarcrm-25-api":
        (dotenv,) = doc_blocks(heading, "ini")
        assert DOC_SITE in dotenv
        (tmp_path / ".env").write_text(dotenv.replace(DOC_SITE, url))
        out = run_python(code, tmp_path)
    else:
        if "SUGARD_SOCKET" not in code:
            assert DOC_SITE in code
        exec(compile(code.replace(DOC_SITE, url), "docs/proxy.md", "exec"), {"__name__": "doc"})  # noqa: S102 - the doc's own example
        out = capsys.readouterr().out
    assert f"{printed}\n" == out
    session.assert_untouched()
