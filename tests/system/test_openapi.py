"""GET /v1/openapi.json describes the API exactly: schemathesis (from PyPI) generates requests
from it against a live daemon and checks every answer against it.

schemathesis talks through `requests`; a transport adapter mounted on the session connects to
the daemon's Unix socket, so the real daemon is tested on its real socket, with the peer
credential check in place (this process is the daemon's own uid).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from support.daemon import instance, write_config
from support.http import unix_session

from sugard.api import make_app
from sugard.api.openapi import PROXIED_AS_PATH, PROXIED_METHODS, PROXIED_PATH, spec
from sugard.testing import FakeSugar

EXAMPLES_PER_OPERATION = 40  # per operation and mode (4 of the 9 operations take input)


@pytest.fixture
def live(fake: FakeSugar, short_dir: Path, start_daemon) -> Iterator[requests.Session]:
    """A daemon with instance `prod` (the name the schema's examples use), and a session to it."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with unix_session(daemon.socket) as session:
        yield session


def test_the_daemon_serves_the_description(live: requests.Session) -> None:
    """GET /v1/openapi.json answers exactly the document `sugard.api.openapi.spec()` builds."""
    response = live.get("http://sugard/v1/openapi.json")
    assert 200 == response.status_code
    assert spec() == response.json()


def test_every_route_is_described_and_nothing_else() -> None:
    """The paths and methods of the document are exactly the app's routes."""

    class Nobody:
        keepers: ClassVar[dict[str, Any]] = {}

    routes = {
        (method, r.resource.canonical)
        for r in make_app(Nobody(), lambda: 0.0).router.routes()  # type: ignore[arg-type]
        if r.method != "HEAD" and r.resource is not None
        # The proxied route takes any method; the document names the ones Sugar uses.
        for method in (PROXIED_METHODS if r.method == "*" else (r.method.lower(),))
    }
    described = {
        (method, path)
        for path, item in spec()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == described


@pytest.mark.slow
def test_curl_error_answers_match_the_description(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Errors seen through curl carry only the documented keys and codes."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    document = spec()
    codes = set(document["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    for path in (
        "/v1/instances/nope",
        "/v1/instances/a%20b/token",
        "/v1/nothing",
        "/v1/instances/prod/token?wait=soon",
    ):
        out = subprocess.run(
            ["curl", "-sS", "--unix-socket", str(daemon.socket), f"http://sugard{path}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        body = json.loads(out)
        assert {"error", "message"} == set(body)
        assert body["error"] in codes


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(
    live: requests.Session,
) -> None:
    """Positive and negative requests generated from the served document, every built-in
    check: no 5xx, and every status, content type, header and body as described."""
    document = live.get("http://sugard/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    # Not the proxied routes: what they answer is Sugar's (tests/system/test_proxy.py and
    # test_sudo.py cover them).
    operations = [
        op
        for op in (result.ok() for result in schema.get_all_operations())
        if op.path not in (PROXIED_PATH, PROXIED_AS_PATH)
    ]
    assert {
        "GET /v1/health",
        "GET /v1/openapi.json",
        "GET /v1/metrics",
        "GET /v1/instances",
        "GET /v1/instances/{name}",
        "GET /v1/instances/{name}/token",
        "GET /v1/instances/{name}/proxy",
        "GET /v1/instances/{name}/clients",
        "POST /v1/instances/{name}/invalidate",
        "POST /v1/instances/{name}/refresh",
        "POST /v1/instances/{name}/revoke",
        "POST /v1/reload",
        "POST /v1/shutdown",
    } == {f"{op.method.upper()} {op.path}" for op in operations}
    # A shutdown would end the daemon under the other examples: it has a test of its own.
    operations = [op for op in operations if op.path != "/v1/shutdown"]
    calls: dict[str, int] = {}
    statuses: set[int] = set()
    for operation in operations:
        described = document["paths"][operation.path]
        has_input = "parameters" in described or {"parameters", "requestBody"} & set(
            described[operation.method.lower()]
        )
        # Without parameters or a body there is nothing to make invalid.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else [])
        for mode in modes:

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                key = f"{case.method} {case.path} {case.meta.generation.mode.value}"  # type: ignore[union-attr]
                calls[key] = calls.get(key, 0) + 1
                response = case.call_and_validate(session=live, base_url="http://sugard")
                statuses.add(response.status_code)

            check()
    total = sum(calls.values())
    print(f"schemathesis ran {total} examples: {json.dumps(calls, indent=1)}")
    assert total >= 8 * 5 + 4 * 5
    assert {200, 400, 404} <= statuses  # the examples reached real tokens, bad input, unknowns


@pytest.mark.slow
@pytest.mark.parametrize("systemd", [False, True])
def test_shutdown_answers_as_described(
    fake: FakeSugar, short_dir: Path, start_daemon, systemd: bool
) -> None:
    """POST /v1/shutdown answers 202 (then the daemon goes), or 409 `under_systemd` for a
    daemon systemd started, each checked by schemathesis against the served document."""
    env = {"INVOCATION_ID": "0123456789abcdef"} if systemd else {}
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}), env=env)
    with unix_session(daemon.socket) as session:
        document = session.get("http://sugard/v1/openapi.json").json()
        schema = schemathesis.openapi.from_dict(document)
        case = schema["/v1/shutdown"]["POST"].Case()
        response = case.call_and_validate(session=session, base_url="http://sugard")
    assert (409 if systemd else 202) == response.status_code
    if not systemd:
        assert 0 == daemon.proc.wait(15)
