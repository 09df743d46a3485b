"""`sugarctl api`'s arguments as sugard.client.api_args reads them, before anything is sent: the
method it picks, where fields go, how PHP will read a typed field, and the PATH rules."""

from __future__ import annotations

import pytest

from sugard.client import BadRequest
from sugard.client.api_args import parse, query_pairs
from sugard.client.api_args import split_path as _split_path


def test_the_method_follows_gh_api_but_a_paginated_run_lists() -> None:
    """No -X: GET, or POST with fields or --input; --paginate stays a GET; -X wins."""
    assert "GET" == parse(["prod", "Accounts"]).method
    assert "POST" == parse(["prod", "Accounts", "-f", "name=Acme"]).method
    assert "POST" == parse(["prod", "Accounts", "--input", "-"]).method
    assert "GET" == parse(["prod", "Accounts", "--paginate", "-f", "max_num=5"]).method
    assert "DELETE" == parse(["prod", "Accounts/1", "-Xdelete"]).method
    assert "PUT" == parse(["prod", "Accounts/1", "--method=put", "-f", "a=b"]).method


def test_fields_go_to_the_body_or_the_query_string() -> None:
    """Fields make a JSON body for POST and PUT, the query string for GET and DELETE and
    next to --input; -F values are JSON, -f values strings, in the order given."""
    post = parse(["prod", "Accounts", "-f", "n=12", "-F", "e=12", "--raw-field=x=y"])
    assert post.body_fields
    assert [("n", "12"), ("e", 12), ("x", "y")] == [(k, v) for k, v, _ in post.fields]
    assert not parse(["prod", "Accounts", "-X", "GET", "-f", "a=b"]).body_fields
    assert not parse(
        ["prod", "Notes/1/file/f", "-X", "PUT", "--input", "-", "-f", "a=b"]
    ).body_fields


def test_typed_fields_become_php_arrays_in_a_query_string() -> None:
    """A list or object nests as key[0][name]=..., booleans are true/false, null is empty."""
    filter_ = [{"name": {"$starts": "A"}}, {"employees": {"$gt": 10}}]
    assert [
        ("filter[0][name][$starts]", "A"),
        ("filter[1][employees][$gt]", "10"),
    ] == list(query_pairs("filter", filter_))
    assert [("a", "true"), ("n", ""), ("f", "1.5")] == [
        *query_pairs("a", True),
        *query_pairs("n", None),
        *query_pairs("f", 1.5),
    ]


def test_the_path_names_its_version_or_gets_the_instances() -> None:
    """v11_20/X and /rest/v11_20/X choose the version; otherwise none (the daemon's answer
    decides); the rest is percent-encoded as a path, a query kept."""
    assert ("v11_20", "Accounts", "") == _split_path("/rest/v11_20/Accounts")
    assert ("v11_20", "Accounts", "") == _split_path("v11_20/Accounts")
    assert (None, "Accounts/a%20b", "max_num=5") == _split_path("Accounts/a b?max_num=5")
    assert (None, "Notes/1/file/filename", "") == _split_path("/Notes/1/file/filename")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["prod", "a/../b"], "'..'"),
        (["prod", "a/%2E%2e/b"], "'..'"),
        (["prod", "https://crm.example.com/rest/v10/me"], "after the site's /rest/"),
        (["prod", "Accounts", "-f", "=x"], "KEY=VALUE"),
        (["prod", "Accounts", "-F", "tags=[a]"], "not JSON"),
        (["prod", "Accounts", "-H", "Content-Length: 5"], "sets Content-Length itself"),
        (["prod", "Accounts", "-f", "a=1", "-F", "a=2"], "given twice"),
        (["prod", "Accounts", "--paginate", "--input", "-"], "leave out --input"),
        (["prod", "Accounts", "-X", "GE T"], "a method is a word"),
        (["prod", "Accounts", "--nosuch"], "unknown option '--nosuch'"),
        (["prod", "Accounts", "extra"], "extra argument 'extra'"),
        ([], "api needs NAME"),
    ],
)
def test_bad_arguments_are_refused_with_a_line_naming_them(argv: list[str], says: str) -> None:
    """Each is a BadRequest (exit 2) whose message names what is wrong."""
    with pytest.raises(BadRequest) as refused:
        parse(argv)
    assert 2 == refused.value.exit_code
    assert says in refused.value.message
