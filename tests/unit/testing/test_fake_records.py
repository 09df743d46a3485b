# Expected value first in asserts (docs/style.md), which ruff's SIM300 calls a Yoda condition.
"""The fake SugarCRM's records, filters, counts, metadata and file fields, over real HTTP.

What a user's script relies on when it is tested against the fake instead of a real Sugar:
Sugar's answer shapes, its filter language, its paging and its errors, behind the same token
check as every other route. All through `requests` to the fake on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from support import ROOT
from support.sugar_replies import assert_error

from sugard.testing import FakeSugar, running_fake

PASSWORD = "admin-password"
NAMES = ["Acme", "acme west", "Beta", "Gamma", "Delta"]


class Api:
    """A logged-in script: one session, the token in the OAuth-Token header."""

    def __init__(self, site: str, *, version: str = "v10") -> None:
        self.site = site
        self.version = version
        self.http = requests.Session()
        login = self.http.post(
            f"{site}/rest/v10/oauth2/token",
            json={
                "grant_type": "password",
                "client_id": "sugar",
                "client_secret": "",
                "username": "admin",
                "password": PASSWORD,
                "platform": "base",
            },
            timeout=30,
        )
        assert 200 == login.status_code, login.text
        self.tokens = login.json()
        self.headers = {"OAuth-Token": self.tokens["access_token"]}

    def url(self, route: str) -> str:
        return f"{self.site}/rest/{self.version}/{route}"

    def call(self, method: str, route: str, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", self.headers)
        return self.http.request(method, self.url(route), headers=headers, timeout=60, **kw)

    def ok(self, method: str, route: str, **kw: Any) -> Any:
        """The JSON of a 200 answer."""
        reply = self.call(method, route, **kw)
        assert 200 == reply.status_code, reply.text
        return reply.json()

    def names(self, method: str, route: str, **kw: Any) -> list[str]:
        """The `name`s of the records a list or filter answer holds, in its order."""
        return [r.get("name") for r in self.ok(method, route, **kw)["records"]]


def seeded(names: list[str] = NAMES) -> dict[str, list[dict[str, Any]]]:
    """Accounts named `names`, with a rank each: 1, 2, 3, ..."""
    return {"Accounts": [{"name": n, "rank": i} for i, n in enumerate(names, 1)]}


# `fake` (conftest): a fake holding the NAMES accounts, admin its one user.
pytestmark = pytest.mark.fake(users={"admin": PASSWORD}, records=seeded())


@pytest.fixture
def api(fake: FakeSugar) -> Api:
    """admin, logged in to `fake` on platform base."""
    return Api(fake.url)


# ---------------------------------------------------------------- create, read, update, delete


def test_create_answers_the_record_with_id_and_dates(api: Api, fake: FakeSugar) -> None:
    """POST /Module stores the fields and answers the record: id, _module, both dates."""
    created = api.ok("POST", "Contacts", json={"first_name": "Ada", "vip": True})
    uuid.UUID(created["id"])
    assert {"first_name": "Ada", "vip": True, "_module": "Contacts"}.items() <= created.items()
    assert created["date_entered"] == created["date_modified"]
    assert created["date_entered"].endswith("+00:00")
    assert [created] == fake.records("Contacts")
    assert created == api.ok("GET", f"Contacts/{created['id']}")


def test_create_keeps_a_given_id_but_never_a_taken_one(api: Api) -> None:
    """A create may choose its id; the same id again is 422, as in Sugar."""
    assert "fixed-id" == api.ok("POST", "Notes", json={"id": "fixed-id", "name": "n"})["id"]
    again = assert_error(
        api.call("POST", "Notes", json={"id": "fixed-id"}), 422, "invalid_parameter"
    )
    assert "Record already exists: fixed-id in module: Notes" == again["error_message"]


def test_update_changes_fields_and_date_modified_only(api: Api, fake: FakeSugar) -> None:
    """PUT changes the fields sent and date_modified, never the id or date_entered."""
    created = api.ok("POST", "Accounts", json={"name": "Old", "city": "Bonn"})
    fake.clock = lambda: time.time() + 60
    updated = api.ok(
        "PUT",
        f"Accounts/{created['id']}",
        json={"name": "New", "id": "other", "date_entered": "2000-01-01T00:00:00+00:00"},
    )
    assert ("New", "Bonn", created["id"]) == (updated["name"], updated["city"], updated["id"])
    assert created["date_entered"] == updated["date_entered"]
    assert created["date_modified"] < updated["date_modified"]
    assert updated == api.ok("GET", f"Accounts/{created['id']}")


def test_delete_answers_the_id_then_the_record_is_gone(api: Api, fake: FakeSugar) -> None:
    """DELETE answers {"id": ...}; afterwards GET, PUT and DELETE of it are 404 not_found."""
    record_id = fake.records("Accounts")[0]["id"]
    assert {"id": record_id} == api.ok("DELETE", f"Accounts/{record_id}")
    gone = assert_error(api.call("GET", f"Accounts/{record_id}"), 404, "not_found")
    assert f"Could not find record: {record_id} in module: Accounts" == gone["error_message"]
    assert_error(api.call("PUT", f"Accounts/{record_id}", json={"name": "x"}), 404, "not_found")
    assert_error(api.call("DELETE", f"Accounts/{record_id}"), 404, "not_found")
    assert len(NAMES) - 1 == len(fake.records("Accounts"))


def test_a_body_that_is_not_a_json_object_is_422(api: Api) -> None:
    """A create or update body must be a JSON object."""
    assert_error(api.call("POST", "Accounts", data="{nope"), 422, "invalid_parameter")
    assert_error(api.call("POST", "Accounts", json=["a"]), 422, "invalid_parameter")


# ---------------------------------------------------------------- list: paging, order, fields


def test_list_answers_sugars_shape(api: Api) -> None:
    """GET /Module answers {"next_offset", "records"}, each record with its _module."""
    body = api.ok("GET", "Accounts")
    assert ["next_offset", "records"] == list(body)
    assert -1 == body["next_offset"]
    assert {"Accounts"} == {r["_module"] for r in body["records"]}
    assert {"id", "name", "rank", "date_entered", "date_modified"} <= set(body["records"][0])


def test_paging_with_max_num_offset_and_next_offset() -> None:
    """20 records a page by default; next_offset is where the next page starts, -1 at the end."""
    many = [f"n{i:02d}" for i in range(45)]
    with running_fake(users={"admin": PASSWORD}, records=seeded(many)) as fake:
        api = Api(fake.url)
        pages, offset = [], 0
        while offset != -1:
            body = api.ok("GET", "Accounts", params={"offset": offset, "order_by": "name"})
            pages.append(len(body["records"]))
            offset = body["next_offset"]
        assert [20, 20, 5] == pages
        page = api.ok("GET", "Accounts", params={"max_num": 10, "offset": 40, "order_by": "name"})
        assert (-1, ["n40", "n41", "n42", "n43", "n44"]) == (
            page["next_offset"],
            [r["name"] for r in page["records"]],
        )
        assert 45 == len(api.names("GET", "Accounts", params={"max_num": -1}))
        exact = api.ok("GET", "Accounts", params={"max_num": 45})
        assert (45, -1) == (len(exact["records"]), exact["next_offset"])


def test_default_order_is_last_modified_first(api: Api, fake: FakeSugar) -> None:
    """Without order_by, Sugar lists by date_modified, newest first."""
    first = fake.records("Accounts")[0]["id"]
    fake.clock = lambda: time.time() + 60
    api.ok("PUT", f"Accounts/{first}", json={"city": "Rome"})
    assert "Acme" == api.names("GET", "Accounts")[0]


@pytest.mark.parametrize(
    ("order_by", "expected"),
    [
        ("name", ["Acme", "acme west", "Beta", "Delta", "Gamma"]),
        ("name:desc", ["Gamma", "Delta", "Beta", "acme west", "Acme"]),
        ("rank:desc", ["Delta", "Gamma", "Beta", "acme west", "Acme"]),
        ("group:asc,rank:desc", ["Delta", "Beta", "Acme", "Gamma", "acme west"]),
    ],
)
def test_order_by(order_by: str, expected: list[str]) -> None:
    """order_by=field[:desc], comma-separated; text is case-blind, numbers numeric, null first."""
    groups = {"Acme": "b", "acme west": "c", "Beta": "b", "Gamma": "c"}  # Delta has none
    rows = [{"name": n, "rank": i, "group": groups.get(n)} for i, n in enumerate(NAMES, 1)]
    rows[4].pop("group")
    with running_fake(users={"admin": PASSWORD}, records={"Accounts": rows}) as fake:
        assert expected == Api(fake.url).names("GET", "Accounts", params={"order_by": order_by})


def test_fields_trim_the_records_but_keep_id_and_date_modified(api: Api) -> None:
    """fields=a,b (or a JSON list in a POST) returns those plus id and date_modified."""
    listed = api.ok("GET", "Accounts", params={"fields": "name"})["records"][0]
    assert {"name", "id", "date_modified", "_module"} == set(listed)
    posted = api.ok("POST", "Accounts/filter", json={"fields": ["rank"]})["records"][0]
    assert {"rank", "id", "date_modified", "_module"} == set(posted)
    one = api.ok("GET", f"Accounts/{listed['id']}")
    assert "rank" in one


# ---------------------------------------------------------------- the filter language


@pytest.mark.parametrize(
    ("clause", "expected"),
    [
        ({"name": "beta"}, {"Beta"}),  # the implicit $equals, case-blind as MySQL
        ({"name": {"$equals": "Acme"}}, {"Acme"}),
        ({"name": {"$not_equals": "Acme"}}, {"acme west", "Beta", "Gamma", "Delta"}),
        ({"name": {"$starts": "ac"}}, {"Acme", "acme west"}),
        ({"name": {"$ends": "TA"}}, {"Beta", "Delta"}),
        ({"name": {"$contains": "mm"}}, {"Gamma"}),
        ({"name": {"$not_contains": "a"}}, set()),
        ({"name": {"$in": ["Beta", "gamma"]}}, {"Beta", "Gamma"}),
        ({"name": {"$not_in": ["Beta", "Gamma"]}}, {"Acme", "acme west", "Delta"}),
        ({"rank": {"$gt": 3}}, {"Gamma", "Delta"}),
        ({"rank": {"$gte": "3"}}, {"Beta", "Gamma", "Delta"}),  # a number given as text
        ({"rank": {"$lt": 2}}, {"Acme"}),
        ({"rank": {"$lte": 2}}, {"Acme", "acme west"}),
        ({"rank": {"$between": [2, 4]}}, {"acme west", "Beta", "Gamma"}),
        ({"city": {"$is_null": ""}}, {"acme west", "Beta", "Gamma", "Delta"}),
        ({"city": {"$not_null": ""}}, {"Acme"}),
        ({"city": {"$empty": ""}}, {"acme west", "Beta", "Gamma", "Delta"}),
        ({"city": {"$not_empty": ""}}, {"Acme"}),
        ({"name": {"$starts": "a"}, "rank": 2}, {"acme west"}),  # two keys: both must hold
        ({"$or": [{"name": "Beta"}, {"rank": {"$gte": 5}}]}, {"Beta", "Delta"}),
        (
            {"$and": [{"name": {"$starts": "A"}}, {"$or": [{"rank": 1}, {"city": "Oslo"}]}]},
            {"Acme"},
        ),
    ],
)
def test_each_filter_operator(api: Api, fake: FakeSugar, clause: Any, expected: set[str]) -> None:
    """Every operator of Sugar's filter language, in a POST /Module/filter body."""
    acme = fake.records("Accounts")[0]["id"]
    api.ok("PUT", f"Accounts/{acme}", json={"city": "Oslo"})
    assert expected == set(api.names("POST", "Accounts/filter", json={"filter": [clause]}))


def test_filter_in_the_query_string(api: Api) -> None:
    """filter[0][field][$op]=... works on the list, filter and count routes, as in Sugar."""
    starts = {"filter[0][name][$starts]": "A"}
    assert {"Acme", "acme west"} == set(api.names("GET", "Accounts/filter", params=starts))
    assert {"Acme", "acme west"} == set(api.names("GET", "Accounts", params=starts))
    assert {"record_count": 2} == api.ok("GET", "Accounts/count", params=starts)
    assert {"record_count": 2} == api.ok("GET", "Accounts/filter/count", params=starts)
    in_list = [("filter[0][name][$in][]", "Beta"), ("filter[0][name][$in][]", "Delta")]
    assert {"Beta", "Delta"} == set(api.names("GET", "Accounts/filter", params=in_list))
    either = [("filter[0][$or][0][rank]", "1"), ("filter[0][$or][1][rank]", "5")]
    assert {"Acme", "Delta"} == set(api.names("GET", "Accounts", params=either))


def test_filter_as_json_text_in_the_query_string(api: Api) -> None:
    """filter is one of FilterApi's JSON parameters: a GET may send it as JSON text."""
    params = {"filter": json.dumps([{"rank": {"$gt": 4}}])}
    assert ["Delta"] == api.names("GET", "Accounts/filter", params=params)


def test_filter_with_paging_and_fields(api: Api) -> None:
    """A POST filter body takes max_num, offset, order_by and fields too."""
    body = {"filter": [{"rank": {"$gt": 1}}], "max_num": 2, "offset": 1, "order_by": "rank"}
    page = api.ok("POST", "Accounts/filter", json=body | {"fields": "name"})
    assert (3, ["Beta", "Gamma"]) == (page["next_offset"], [r["name"] for r in page["records"]])
    assert {"name", "id", "date_modified", "_module"} == set(page["records"][0])


def test_counts(api: Api) -> None:
    """/count and /filter/count answer {"record_count": N}, filtered or not."""
    assert {"record_count": 5} == api.ok("GET", "Accounts/count")
    assert {"record_count": 0} == api.ok("GET", "Nothing/count")
    body = {"filter": [{"rank": {"$lt": 3}}], "max_num": 1}
    assert {"record_count": 2} == api.ok("POST", "Accounts/filter/count", json=body)


@pytest.mark.parametrize(
    ("filter_value", "message"),
    [
        ([{"name": {"$like": "A%"}}], "Did not recognize the operand: $like"),
        ([{"name": {"$in": "Acme"}}], "$in requires an array"),
        ([{"name": {"$not_in": 3}}], "$not_in requires an array"),
        ([{"rank": {"$between": [1]}}], "$between requires an array with two values."),
        (["name"], "Did not recognize the definition: name"),
        ([{"$or": "name"}], "Did not recognize the definition: name"),
        ([{"$owner": ""}], "Unknown field $owner"),
        ("name", "Unexpected filter type string."),
        ([{"name": ["Acme", "Beta"]}], "Did not recognize the operand: 0"),
    ],
)
def test_bad_filters_are_422(api: Api, filter_value: Any, message: str) -> None:
    """A filter Sugar cannot read answers 422 invalid_parameter with Sugar's own text."""
    reply = api.call("POST", "Accounts/filter", json={"filter": filter_value})
    assert message == assert_error(reply, 422, "invalid_parameter")["error_message"]
    count = api.call("POST", "Accounts/filter/count", json={"filter": filter_value})
    assert_error(count, 422, "invalid_parameter")


def test_bad_query_string_filters_are_422(api: Api) -> None:
    """The same checks apply to a filter sent in the query string."""
    bad = {"filter[0][name][$nope]": "x"}
    assert_error(api.call("GET", "Accounts", params=bad), 422, "invalid_parameter")
    assert_error(api.call("GET", "Accounts/count", params=bad), 422, "invalid_parameter")
    broken = {"filter": "[{"}
    assert_error(api.call("GET", "Accounts/filter", params=broken), 422, "invalid_parameter")


# ---------------------------------------------------------------- the token check, versions


ROUTES = [
    ("GET", "Accounts"),
    ("POST", "Accounts"),
    ("GET", "Accounts/some-id"),
    ("PUT", "Accounts/some-id"),
    ("DELETE", "Accounts/some-id"),
    ("GET", "Accounts/filter"),
    ("POST", "Accounts/filter"),
    ("GET", "Accounts/count"),
    ("GET", "Accounts/filter/count"),
    ("GET", "metadata"),
    ("GET", "Accounts/some-id/file/doc"),
    ("POST", "Accounts/some-id/file/doc"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_every_route_needs_a_live_token(api: Api, fake: FakeSugar, method: str, route: str) -> None:
    """No token is 401 need_login; an unknown one invalid_grant; an expired one "has expired"."""
    assert_error(api.call(method, route, headers={}), 401, "need_login")
    unknown = {"OAuth-Token": str(uuid.uuid4())}
    assert_error(api.call(method, route, headers=unknown), 401, "invalid_grant")
    fake.expire_access_tokens()
    expired = assert_error(api.call(method, route), 401, "invalid_grant")
    assert "The access token provided has expired." == expired["error_message"]


def test_maintenance_blocks_records_but_not_metadata(api: Api, fake: FakeSugar) -> None:
    """Records answer 503 maintenance; metadata, like /me, ignores the site status in Sugar."""
    fake.maintenance = True
    assert fake.url == assert_error(api.call("GET", "Accounts"), 503, "maintenance")["url"]
    assert_error(api.call("POST", "Accounts/filter", json={}), 503, "maintenance")
    assert 200 == api.call("GET", "metadata").status_code
    fake.maintenance = False
    fake.license_error = "expired"
    assert_error(api.call("GET", "Accounts/count"), 503, "admin_only")


@pytest.mark.parametrize("version", ["v10", "v11", "v11_24"])
def test_record_routes_answer_on_every_supported_version(fake: FakeSugar, version: str) -> None:
    """v10, v11 and v11_N serve the record routes alike."""
    assert 5 == len(Api(fake.url, version=version).names("GET", "Accounts"))


@pytest.mark.parametrize("version", ["v9", "v12", "v4_1"])
def test_other_versions_are_301(api: Api, version: str) -> None:
    """Other versions answer 301 incorrect_version, before any token check."""
    reply = api.http.get(f"{api.site}/rest/{version}/Accounts", allow_redirects=False)
    assert_error(reply, 301, "incorrect_version")


def test_unknown_routes_stay_404(api: Api) -> None:
    """A path that is no Sugar route answers 404 no_method, also under a module name."""
    assert_error(api.call("GET", "Accounts/a/b"), 404, "no_method")
    assert_error(api.call("PATCH", "Accounts/a"), 404, "no_method")
    assert_error(api.call("GET", "accounts"), 404, "no_method")


# ---------------------------------------------------------------- metadata


def test_metadata_answers_the_sections_asked_for(api: Api) -> None:
    """type_filter picks the sections; server_info names flavor, version and build."""
    both = api.ok("GET", "metadata", params={"type_filter": "server_info,modules"})
    assert {"server_info", "modules", "_hash"} == set(both)
    assert {"_hash"} <= set(both["server_info"])
    assert ("ENT", "26.1.0") == (both["server_info"]["flavor"], both["server_info"]["version"])
    assert isinstance(both["server_info"]["build"], str)
    assert {} == both["modules"]
    only = api.ok("GET", "metadata", params={"type_filter": "server_info"})
    assert {"server_info", "_hash"} == set(only)
    assert only == api.ok("GET", "metadata", params={"type_filter": "server_info"})
    assert only["_hash"] != both["_hash"]
    everything = api.ok("GET", "metadata")
    assert {"server_info", "modules", "full_module_list", "_hash"} == set(everything)
    assert {"Accounts", "_hash"} == set(everything["full_module_list"])


def test_metadata_version_follows_sugar_version() -> None:
    """sugar_version= picks what server_info reports."""
    with running_fake(users={"admin": PASSWORD}, sugar_version="13.0") as fake:
        info = Api(fake.url).ok("GET", "metadata", params={"type_filter": "server_info"})
        assert "13.0.0" == info["server_info"]["version"]


# ---------------------------------------------------------------- seeding and reading back


def test_seeded_records_are_served_and_read_back() -> None:
    """records= seeds any module; given ids and dates are kept, missing ones filled in; the
    fake keeps its own copies, apart from the seed and from what records() returns."""
    seed = {
        "Accounts": [{"id": "a-1", "name": "Acme", "date_modified": "2020-01-01T00:00:00+00:00"}],
        "Cases": [{"subject": "Broken", "tags": ["urgent"]}],
    }
    pristine = copy.deepcopy(seed)
    with running_fake(users={"admin": PASSWORD}, records=seed) as fake:
        api = Api(fake.url)
        acme = api.ok("GET", "Accounts/a-1")
        assert ("Acme", "2020-01-01T00:00:00+00:00") == (acme["name"], acme["date_modified"])
        case = fake.records("Cases")[0]
        assert ("Broken", "Cases") == (case["subject"], case["_module"])
        assert case == api.ok("GET", f"Cases/{case['id']}")
        assert [] == fake.records("Leads")
        assert pristine == seed  # the fake edits no object of the caller's
        fake.records("Cases")[0]["tags"].append("edited by the test")
        seed["Cases"][0]["tags"].append("edited after seeding")
        assert ["urgent"] == api.ok("GET", f"Cases/{case['id']}")["tags"]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"accounts": []}, "module name 'accounts'"),
        ({"Accounts": {"name": "x"}}, "must be a list"),
        ({"Accounts": ["x"]}, "must be an object"),
        (["Accounts"], "must map module names"),
    ],
)
def test_bad_seeds_fail_loudly(records: Any, message: str) -> None:
    """A seed the fake cannot serve is a ValueError saying what to fix."""
    with pytest.raises(ValueError, match=message):
        FakeSugar(records=records)


def test_module_seeds_from_a_json_file(tmp_path: Path) -> None:
    """`python -m sugard.testing --seed data.json` serves those records; a bad file exits 2."""
    seed = tmp_path / "data.json"
    seed.write_text(json.dumps(seeded(["Acme", "Beta"])))
    with fake_process("--seed", str(seed)) as (_proc, url):
        api = Api(url)
        assert {"Acme", "Beta"} == set(api.names("GET", "Accounts"))
    seed.write_text('{"Accounts": [')
    bad = subprocess.run(
        [sys.executable, "-m", "sugard.testing", "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (2, "") == (bad.returncode, bad.stdout)
    assert "is not valid JSON" in bad.stderr


# ---------------------------------------------------------------- latency


def test_latency_slows_the_routes_named(api: Api, fake: FakeSugar) -> None:
    """latency={"filter": s} holds every filter answer back by at least s seconds."""
    fake.latency["filter"] = 0.3
    began = time.monotonic()
    assert 5 == len(api.names("POST", "Accounts/filter", json={}))
    assert time.monotonic() - began >= 0.3
    assert 1 == fake.calls["filter"]


def test_latency_for_an_unknown_route_is_refused() -> None:
    """A typo in a route name fails loudly instead of slowing nothing."""
    with pytest.raises(ValueError, match="latency for unknown routes"):
        FakeSugar(latency={"filters": 1.0})


# ---------------------------------------------------------------- file fields


def test_multipart_upload_and_download_are_byte_exact(api: Api, fake: FakeSugar) -> None:
    """POST multipart stores the file; GET returns the same bytes, with Sugar's headers."""
    note = api.ok("POST", "Notes", json={"name": "with file"})
    blob = os.urandom(300_000) + b"\r\n--boundary-like--\r\n"
    route = f"Notes/{note['id']}/file/filename"
    uploaded = api.ok("POST", route, files={"filename": ("report.pdf", blob, "application/pdf")})
    info = uploaded["filename"]
    assert ("application/pdf", len(blob), "report.pdf") == (
        info["content-type"],
        info["content-length"],
        info["name"],
    )
    assert info["uri"].endswith(f"/rest/v10/{route}")
    assert "report.pdf" == uploaded["record"]["filename"]
    download = api.call("GET", route)
    assert (200, blob) == (download.status_code, download.content)
    assert "application/pdf" == download.headers["Content-Type"]
    assert 'attachment; filename="report.pdf"' == download.headers["Content-Disposition"]
    assert str(len(blob)) == download.headers["Content-Length"]


def test_download_with_the_download_token(api: Api, fake: FakeSugar) -> None:
    """?download_token=&platform= works without the header; a rotated one does not."""
    note = api.ok("POST", "Notes", json={"name": "n"})
    route = f"Notes/{note['id']}/file/filename"
    api.ok("PUT", route, params={"filename": "a.bin"}, data=b"\x00\x01\x02")
    query = {"download_token": api.tokens["download_token"], "platform": "base"}
    assert b"\x00\x01\x02" == api.call("GET", route, headers={}, params=query).content
    unknown = {"download_token": str(uuid.uuid4()), "platform": "base"}
    assert_error(api.call("GET", route, headers={}, params=unknown), 401, "invalid_grant")
    refreshed = api.http.post(
        f"{fake.url}/rest/v10/oauth2/token",
        json={
            "grant_type": "refresh_token",
            "refresh_token": api.tokens["refresh_token"],
            "client_id": "sugar",
            "platform": "base",
        },
        timeout=30,
    )
    assert 200 == refreshed.status_code
    assert_error(api.call("GET", route, headers={}, params=query), 401, "invalid_grant")
    fresh = {"download_token": refreshed.json()["download_token"], "platform": "base"}
    assert 200 == api.call("GET", route, headers={}, params=fresh).status_code


def test_raw_put_upload_replaces_the_file(api: Api) -> None:
    """PUT takes the raw body (name from ?filename=), as Sugar's saveFilePut; the last one wins."""
    note = api.ok("POST", "Notes", json={"name": "n"})
    route = f"Notes/{note['id']}/file/filename"
    api.ok("POST", route, files={"filename": ("old.txt", b"old")})
    put = api.ok(
        "PUT",
        route,
        params={"filename": "new.csv"},
        data=b"a,b\n1,2\n",
        headers=api.headers | {"Content-Type": "text/csv"},
    )
    assert ("new.csv", "text/csv", 8) == (
        put["filename"]["name"],
        put["filename"]["content-type"],
        put["filename"]["content-length"],
    )
    assert b"a,b\n1,2\n" == api.call("GET", route).content


def test_file_route_errors(api: Api) -> None:
    """Sugar's answers for a missing record, an empty field, a wrong part or no attachment."""
    note = api.ok("POST", "Notes", json={"name": "n"})
    route = f"Notes/{note['id']}/file/filename"
    assert_error(api.call("GET", "Notes/nope/file/filename"), 404, "not_found")
    assert_error(
        api.call("POST", "Notes/nope/file/filename", files={"filename": ("a", b"a")}),
        404,
        "not_found",
    )
    empty = assert_error(api.call("GET", route), 404, "not_found")
    assert "The requested file Notes :: filename could not be found." == empty["error_message"]
    wrong = api.call("POST", route, files={"other": ("a.txt", b"a")})
    assert (
        "Incorrect field name for attachement: filename"
        == (assert_error(wrong, 400, "missing_parameter")["error_message"])
    )
    raw_post = api.call("POST", route, data=b"not multipart")
    assert (
        "Attachment is missing" == assert_error(raw_post, 400, "missing_parameter")["error_message"]
    )
    assert_error(api.call("PUT", route, data=b""), 400, "missing_parameter")
    api.ok("POST", route, files={"filename": ("a.txt", b"a")})
    api.ok("DELETE", f"Notes/{note['id']}")
    assert_error(api.call("GET", route), 404, "not_found")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_large_transfer_streams_in_bounded_memory(tmp_path: Path) -> None:
    """256 MiB up and down, byte-exact, while the fake's peak RSS grows by far less than that;
    the uploaded files and their directory are gone when the fake exits."""
    size = 256 * 1024 * 1024
    files_dir = tmp_path / "tmp"
    files_dir.mkdir()
    with fake_process(env={"TMPDIR": str(files_dir)}) as (proc, url):
        before = peak_rss(proc.pid)
        sent, received = asyncio.run(transfer(url, size))
        after = peak_rss(proc.pid)
        assert sent == received
        print(f"fake peak RSS {before // 2**20} MiB before, {after // 2**20} MiB after 2x256 MiB")
        assert after - before < 48 * 2**20
        assert any(files_dir.iterdir())
    assert [] == list(files_dir.iterdir())


# ---------------------------------------------------------------- helpers for the subprocess


class fake_process:
    """`python -m sugard.testing ARGS` with admin/admin-password; yields (process, url)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "sugard.testing", "--user", f"admin:{PASSWORD}", *args]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def __enter__(self) -> tuple[subprocess.Popen[str], str]:
        assert self.proc.stdout is not None
        url = self.proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), self.proc.stderr
        return self.proc, url

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert 0 == self.proc.wait(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def transfer(url: str, size: int) -> tuple[str, str]:
    """Upload `size` generated bytes as a multipart file, download them; both sha256 digests."""
    block = os.urandom(1024 * 1024)
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            sent.update(block)
            yield block

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        login = await http.post(
            f"{url}/rest/v10/oauth2/token",
            json={
                "grant_type": "password",
                "client_id": "sugar",
                "username": "admin",
                "password": PASSWORD,
                "platform": "base",
            },
        )
        headers = {"OAuth-Token": (await login.json())["access_token"]}
        async with http.post(f"{url}/rest/v10/Notes", json={"name": "big"}, headers=headers) as r:
            note = (await r.json())["id"]
        route = f"{url}/rest/v10/Notes/{note}/file/filename"
        form = aiohttp.MultipartWriter("form-data")
        part = form.append(body(), {"Content-Type": "application/octet-stream"})
        part.set_content_disposition("form-data", name="filename", filename="big.bin")
        async with http.post(route, data=form, headers=headers) as r:
            assert 200 == r.status, await r.text()
            assert size == (await r.json())["filename"]["content-length"]
        received = hashlib.sha256()
        async with http.get(route, headers=headers) as r:
            assert 200 == r.status
            async for chunk in r.content.iter_chunked(256 * 1024):
                received.update(chunk)
    return sent.hexdigest(), received.hexdigest()


@pytest.mark.slow
def test_the_fixture_example_in_docs_testing_passes(tmp_path: Path) -> None:
    """docs/testing.md's pytest example runs green, as a user would run it."""
    docs = (ROOT / "docs" / "testing.md").read_text()
    example = docs.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "test_example.py").write_text(example)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == run.returncode, run.stdout + run.stderr
    assert "1 passed" in run.stdout
