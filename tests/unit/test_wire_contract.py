"""sugard.wire is the one table of the socket API's contract: the keeper's states, each error
code's HTTP status and the client's exit code for it. Who may import whom is pinned by the
import-linter contracts, no longer here."""

from __future__ import annotations


def test_both_ends_take_the_wire_contract_from_one_table() -> None:
    """The keeper's states, the HTTP status of each error code in the OpenAPI document and the
    exit code each raises in the client are sugard.wire's: a drift on either end fails here."""
    from sugard import client, wire
    from sugard.api.openapi import spec
    from sugard.keeper import State

    assert list(wire.STATES) == [state.value for state in State]
    assert {code: exit_code for code, (_, exit_code) in wire.ERRORS.items()} == {
        code: cls.exit_code for code, cls in client._ERRORS.items()
    }
    seen = set()
    for item in spec()["paths"].values():
        for operation in item.values():
            for status, answer in (
                operation.get("responses", {}).items() if isinstance(operation, dict) else ()
            ):
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                for part in schema.get("allOf", ()):
                    for code in part.get("properties", {}).get("error", {}).get("enum", ()):
                        seen.add(code)
                        # bad_request also answers a body too slow (408) or too large (413)
                        assert int(status) == wire.http_status(code) or (
                            code == "bad_request" and status in ("408", "413")
                        ), (status, code)
    assert {"bad_request", "busy", "forbidden", "unknown_instance"} <= seen


def test_the_user_name_rule_and_its_pattern_agree() -> None:
    """`sudo_user_problem` (the daemon's and sugarctl's check) and SUDO_USER_PATTERN (the
    OpenAPI document's) accept the same user names: every character of the first planes in
    a name, names of dots and stars, the empty name."""
    import re

    from sugard.wire import SUDO_USER_PATTERN, sudo_user_problem

    pattern = re.compile(SUDO_USER_PATTERN)
    names = [f"a{chr(code)}b" for code in range(0x3100)] + ["", ".", "..", "*", ".*.", "j.", "*a"]
    for name in names:
        assert (sudo_user_problem(name) is None) == bool(pattern.fullmatch(name)), repr(name)
    assert sudo_user_problem("jim.o'neil@example.com") is None
    assert all(sudo_user_problem(bad) for bad in ("a/b", "a b", "a\tb", "a\x7fb", "..", "*"))
