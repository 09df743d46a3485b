"""The daemon's errors: one tree, each class carrying the wire code (sugard.wire.ERRORS) that
it answers with on the socket. sugard.api turns any of them into its JSON answer in one place
(`api.answer`); the HTTP status comes from the wire table, never from the class.

    DaemonError                 base; `.code`, `.details()` (extra fields of the answer)
    +-- NoValidToken            token_unavailable  no token within the wait; `.retry_after`
    +-- InstanceNeedsAttention  upstream_rejected  Sugar refused what a person must fix
    +-- InstanceStopped         unknown_instance   removed by a reload, or the daemon stops
    +-- LeaderOnly              bad_request        only the fleet's leader may do this
    +-- UserNotListed           forbidden          a user the instance's `sudo` list lacks
    +-- ReloadFailed            invalid_config     the new config is invalid; `.problems`
    |   +-- ConfigRefused       invalid_config     started by systemd with a config it refuses
    +-- ConfigError             invalid_config     the config cannot be used (sugard.config)
    +-- SocketError             internal           the socket cannot be set up (at start)
    +-- InitError               bad_request        `sugard init` cannot go on (sugard.cli)

The keeper raises the first four; the daemon the reload's and the socket's. What Sugar
answers is another tree (sugard.sugar.UpstreamError): the keeper decides what each means, and
raises one of these. The client's tree (sugard.client.SugardError) is its own, built from the
same wire table, so that `sugarctl` never imports this side.
"""

from __future__ import annotations

from typing import Any

from sugard.wire import ERRORS

__all__ = [
    "ConfigRefused",
    "DaemonError",
    "InstanceNeedsAttention",
    "InstanceStopped",
    "LeaderOnly",
    "NoValidToken",
    "ReloadFailed",
    "SocketError",
    "UserNotListed",
]


class DaemonError(Exception):
    """Base of the daemon's errors; `code` is the error code of its answer on the socket."""

    code = "internal"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code not in ERRORS:
            raise TypeError(f"{cls.__name__}.code {cls.code!r} is not in sugard.wire.ERRORS")

    @property
    def answer_message(self) -> str:
        """The answer's one-line `message`: the error's own words, unless it says otherwise."""
        return str(self)

    def details(self) -> dict[str, Any]:
        """Fields the answer carries beyond `error` and `message`."""
        return {}


class NoValidToken(DaemonError):
    """No valid token within the wait; try again after `retry_after` seconds."""

    code = "token_unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after}


class InstanceNeedsAttention(DaemonError):
    """Sugar refused for a reason a person must fix; sugard will not retry by itself."""

    code = "upstream_rejected"


class InstanceStopped(DaemonError):
    """The instance was removed (reload) or the daemon is stopping."""

    code = "unknown_instance"


class LeaderOnly(DaemonError):
    """Asked of a fleet follower what only the host leading the fleet's session may do (end
    that session at Sugar: `sugarctl revoke`)."""

    code = "bad_request"


class UserNotListed(DaemonError):
    """A token of a user the instance may not act as: its `sudo` list does not name them.
    Refused before any call to Sugar."""

    code = "forbidden"


class ReloadFailed(DaemonError):
    """The new config is invalid; `problems` are one-line messages. The old config stays."""

    code = "invalid_config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    @property
    def answer_message(self) -> str:
        return "the new config has errors; the old one is still running"

    def details(self) -> dict[str, Any]:
        return {"errors": self.problems}


class ConfigRefused(ReloadFailed):
    """systemd started sugard with a config it refuses: it serves nothing but this answer
    (the first problem in the message, all of them in `errors`) until a reload brings a
    valid config, rather than exit and be restarted in a loop that hangs every client."""

    @property
    def answer_message(self) -> str:
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return (
            f"sugard serves nothing until its config is fixed: {self.problems[0]}{more}; "
            "fix it, then `systemctl --user reload sugard`"
        )


class SocketError(DaemonError):
    """The socket cannot be set up; the message says what to do."""
