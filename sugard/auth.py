"""An auth for `requests` that takes Sugar's token from sugard and follows the 401 rule.

    import requests
    from sugard.auth import SugarAuth

    with SugarAuth("prod") as auth, requests.Session() as http:
        http.auth = auth
        me = http.get(f"{auth.url}/rest/v10/me", timeout=30).json()

The 401 rule (the same in every recipe of docs/client.md): when Sugar answers 401 to the token
from sugard, report that token to sugard, retry the request once with the token sugard returns,
and never log in, refresh or log out by itself, since that would end the session every other
script shares. sugard renews the session once however many scripts report the same token.

This module does not import requests: requests calls any callable given as `auth`, so nothing
here needs it, and `import sugard.auth` works (uselessly) where requests is not installed.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urljoin, urlsplit

from sugard.client import SugardClient

__all__ = ["SugarAuth"]

_RETRIED = "_sugard_retried"  # marks a request already sent again after a 401


class SugarAuth:
    """`requests` auth: sets `OAuth-Token`; on a 401, reports the token and retries once; a
    redirect to another host, scheme or port is followed without the token.

    `instance` is the name of the instance in sugard's config; `client` a SugardClient to
    share (one is made on the default socket if none is given); `min_ttl` and `wait` are
    passed to `SugardClient.token`. Errors of sugard (daemon not running, no token now) are
    raised from the request as `sugard.client.SugardError`. Safe to share between threads.
    """

    def __init__(
        self,
        instance: str,
        client: SugardClient | None = None,
        *,
        min_ttl: float = 0,
        wait: float | None = None,
    ) -> None:
        self.instance = instance
        self.client = client if client is not None else SugardClient()
        self.min_ttl = min_ttl
        self.wait = wait
        self._lock = threading.Lock()
        self.reports = 0  # 401s reported to sugard, for logs and tests

    def __repr__(self) -> str:
        return f"SugarAuth({self.instance!r}, {self.client!r})"

    def close(self) -> None:
        """Close the client's kept connection to sugard (it reconnects if used again)."""
        self.client.close()

    def __enter__(self) -> SugarAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The instance's site root (`https://crm.example.com`), as sugard is configured."""
        return str(self.client.token(self.instance, wait=self.wait)["url"])

    def __call__(self, request: Any) -> Any:
        token = self.client.token(self.instance, self.min_ttl, self.wait)
        request.headers["OAuth-Token"] = token["access_token"]
        request.register_hook("response", self._on_response)
        return request

    def _on_response(self, response: Any, **send_kwargs: Any) -> Any:
        if response.is_redirect:
            # requests builds the next hop from this request (a copy, Authorization dropped
            # for another host, but not our header): the token stays with its own site.
            target = urljoin(response.url, response.headers["Location"])
            if _leaves_the_site(response.request.url, target):
                response.request.headers.pop("OAuth-Token", None)
            return response
        if response.status_code != 401:
            return response
        sent = response.request.headers.get("OAuth-Token")
        if not sent or getattr(response.request, _RETRIED, False):
            return response  # retry once, never more
        retry = response.request.copy()
        if not _rewind(retry):
            return response  # a streamed body that cannot be sent again
        new = self.client.invalidate(self.instance, sent)["access_token"]
        with self._lock:
            self.reports += 1
        # Read the 401 to the end, so that its connection goes back to the pool.
        _ = response.content
        response.close()
        retry.headers["OAuth-Token"] = new
        setattr(retry, _RETRIED, True)
        # Sent through the adapter, as requests' own digest auth does: the response hooks
        # (this one included) do not run again for the retry.
        second = response.connection.send(retry, **send_kwargs)
        second.history.append(response)
        second.request = retry
        return second


def _rewind(request: Any) -> bool:
    """Whether the request's body can be sent again (rewinding a seekable stream)."""
    body = request.body
    if body is None or isinstance(body, bytes | str):
        return True
    if hasattr(body, "seek"):
        position = getattr(request, "_body_position", None)
        if isinstance(position, int):
            body.seek(position)
            return True
    return False


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _leaves_the_site(old_url: str, new_url: str) -> bool:
    """Whether a redirect from `old_url` to `new_url` leaves the site, by requests' own rule
    for Authorization (`Session.should_strip_auth`): another host, scheme or port, except
    http on its default port to https on its own."""
    old, new = urlsplit(old_url), urlsplit(new_url)
    if old.hostname != new.hostname:
        return True
    old_port = old.port or _DEFAULT_PORTS.get(old.scheme)
    new_port = new.port or _DEFAULT_PORTS.get(new.scheme)
    if (old.scheme, old_port, new.scheme, new_port) == ("http", 80, "https", 443):
        return False
    return (old.scheme, old_port) != (new.scheme, new_port)
