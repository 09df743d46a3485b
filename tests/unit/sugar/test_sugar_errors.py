"""What `sugar` makes of Sugar's "not now" answers: the class the keeper decides by (it never
reads an HTTP status), and a Retry-After date read against the injected clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from support.daemon import write_config

from sugard import sugar
from sugard.config import load_config
from sugard.sugar import errors

ANSWERS = [
    # (status, Sugar's label, its text) -> the class, its kind, whether the refresh token is gone
    (429, None, "", errors.RateLimited, "rate_limited", False),
    (503, None, "", errors.ServerError, "server_error", False),
    (408, None, "", errors.ServerError, "server_error", False),
    (503, "maintenance", "down for maintenance", errors.Maintenance, "maintenance", False),
    (
        401,
        "need_login",
        "The system is in maintenance mode",
        errors.MaintenanceLogout,
        "maintenance",
        True,
    ),
    (401, "need_login", "Your license has expired", errors.LicenseLogout, "license", True),
    (403, "license_seats_needed", "no seat", errors.LicenseLocked, "license", False),
    (502, None, None, errors.ServerError, "server_error", False),
    (418, None, None, errors.BadResponse, "bad_response", False),
]


@pytest.mark.parametrize(("status", "label", "text", "cls", "kind", "consumed"), ANSWERS)
def test_each_not_now_answer_becomes_its_transient_class(
    tmp_path: Path,
    status: int,
    label: str | None,
    text: str | None,
    cls: type,
    kind: str,
    consumed: bool,
) -> None:
    """The table picks the class; maintenance and license locks are Locked (patient backoff),
    and the 401 ones also say the refresh token is gone (RefreshConsumed)."""
    config = load_config(
        write_config(
            tmp_path, {"prod": {"url": "https://crm.example", "username": "a", "password": "p"}}
        )
    )
    body = (
        b"<html>" if text is None else json.dumps({"error": label, "error_message": text}).encode()
    )
    with pytest.raises(errors.TransientError) as caught:
        sugar._interpret(config.instances["prod"], "refresh_token", status, body, 7.0, 0.0, ())
    assert cls is type(caught.value)
    assert kind == caught.value.kind
    assert consumed == isinstance(caught.value, errors.RefreshConsumed)
    assert (kind in ("maintenance", "license")) == isinstance(caught.value, errors.Locked)


def test_a_retry_after_date_is_read_against_the_given_clock() -> None:
    """An HTTP-date Retry-After counts from the client's clock (injected), not the machine's."""
    when = datetime(2031, 5, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(when, usegmt=True)
    assert 90.0 == sugar._parse_retry_after(header, when.timestamp() - 90)
    assert 0.0 == sugar._parse_retry_after(header, when.timestamp() + 5)
    assert 12.0 == sugar._parse_retry_after("12", 0.0)
