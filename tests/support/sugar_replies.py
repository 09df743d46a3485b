"""What an answer of the fake SugarCRM must look like, read by requests or by aiohttp."""

from __future__ import annotations

from typing import Any


def assert_error(reply: Any, status: int, label: str, *, message: bool = True) -> dict[str, Any]:
    """Sugar's error envelope: the status and label, a message (some OAuth errors have none:
    `message=False`), never cached, and no header Sugar never sends on an error (no challenge;
    Retry-After only on 429 and 503). `reply` is a requests.Response or anything with
    `status`, `body` (parsed JSON) and `headers`. Returns the envelope, for the message."""
    if hasattr(reply, "status_code"):  # requests
        code, body, headers = reply.status_code, reply.json(), reply.headers
    else:
        code, body, headers = reply.status, reply.body, reply.headers
    assert (status, label) == (code, body["error"]), body
    if message:
        assert isinstance(body["error_message"], str)
    assert "no-store" == headers["Cache-Control"]
    assert "WWW-Authenticate" not in headers
    if status not in (429, 503):
        assert "Retry-After" not in headers
    return dict(body)
