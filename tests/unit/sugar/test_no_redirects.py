"""No call that carries a credential follows a redirect: a login, a refresh, `check --login`'s
logout and the probe answered with a 3xx to another host send nothing there, and the login's
and refresh's errors name where the redirect pointed."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.daemon import write_config
from support.redirects import redirecting, serving

from sugard import sugar
from sugard.config import load_config
from sugard.secret import Secret
from sugard.sugar.errors import UpstreamError

PASSWORD = "pw-that-must-stay-home"
REFRESH = "refresh-that-must-stay-home"
ACCESS = "access-that-must-stay-home"


def client_for(tmp_path: Path, url: str, session: object) -> sugar.SugarClient:
    path = write_config(tmp_path, {"prod": {"url": url, "username": "alice", "password": PASSWORD}})
    return sugar.SugarClient(load_config(path).instances["prod"], session)  # type: ignore[arg-type]


def grant() -> sugar.Grant:
    return sugar.Grant(Secret(ACCESS), Secret(REFRESH), Secret(""), "bearer", 0.0, 60.0, None)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_login_and_refresh_do_not_follow_a_redirect_and_name_its_location(
    tmp_path: Path, status: int
) -> None:
    """A 3xx to the token request is an error naming the Location; nothing reaches the
    other host, so neither the password nor the refresh token goes there."""
    with redirecting(status) as (url, other, ours, theirs):
        async with sugar.new_http_session() as session:
            client = client_for(tmp_path, url, session)
            for call in (client.login, lambda: client.refresh(Secret(REFRESH))):
                with pytest.raises(UpstreamError) as caught:
                    await call()
                message = str(caught.value)
                assert f"redirect (HTTP {status}) to {other}/rest/v10/oauth2/token" in message
                assert PASSWORD not in message and REFRESH not in message
        assert 2 == len(ours.requests)
        assert [] == theirs.requests


async def test_logout_and_probe_do_not_follow_a_redirect(tmp_path: Path) -> None:
    """`check --login`'s logout and the token probe answered 307 send nothing to the host the
    redirect names: not the access token, not the refresh token."""
    with redirecting(307) as (url, _, ours, theirs):
        async with sugar.new_http_session() as session:
            client = client_for(tmp_path, url, session)
            await client.logout(grant())
            assert sugar.Probe.UNKNOWN == await client.probe(Secret(ACCESS))
        assert 2 == len(ours.requests)
        assert [] == theirs.requests
        assert not theirs.carried(ACCESS) and not theirs.carried(REFRESH)


async def test_a_token_answer_with_a_header_over_8_kib_is_an_answer_not_unreachable(
    tmp_path: Path,
) -> None:
    """Sugar answering the login with a header line over 8 KiB: the error says the site
    answered with what sugard cannot read (not "cannot reach"), and quotes none of it."""
    with serving(200, headers={"X-Huge": "h" * 9000}) as (url, _):
        async with sugar.new_http_session() as session:
            with pytest.raises(UpstreamError) as caught:
                await client_for(tmp_path, url, session).login()
    message = str(caught.value)
    assert f"{url} answered, but with a header line over 8 KiB" in message
    assert "cannot reach" not in message and "hhhh" not in message
