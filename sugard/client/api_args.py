"""`sugarctl api`'s arguments: read word by word and checked, before anything is sent.

sugarctl's own parser leaves `api`'s arguments to this module (the repeated `-f`/`-F`/`-H` and
the short options it has no use for); sugard.client.api sends what they ask for. Loaded only
when the `api` command runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

from sugard.client import BadRequest
from sugard.wire import sudo_user_problem

__all__ = ["ApiRequest", "Usage", "parse", "query_pairs", "split_path"]

# A path's first segment that names Sugar's REST version: v10, v11, v11_20.
VERSION = re.compile(r"v\d+(?:_\d+)?")
METHOD = re.compile(r"[A-Za-z]+")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Set by sugarctl itself: a value given with -H would contradict the body sent.
OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
QUERY_METHODS = frozenset({"GET", "DELETE", "HEAD"})  # fields go to the query string
PAGED_METHODS = frozenset({"GET", "POST"})  # list and filter calls
# The characters a path may keep as they are; anything else is percent-encoded.
PATH_SAFE = "/%:@!$&'()*+,;=-._~"

VALUED = {
    "-X": "method",
    "--method": "method",
    "-f": "raw-field",
    "--raw-field": "raw-field",
    "-F": "field",
    "--field": "field",
    "-H": "header",
    "--header": "header",
    "-o": "output",
    "--output": "output",
    "--input": "input",
    "--socket": "socket",
    "--as": "as",
}
FLAGS = {"-i": "include", "--include": "include", "--paginate": "paginate"}
HELP = frozenset({"-h", "--help"})


class Usage(BadRequest):
    """A usage error of `api`: exit status 2, with a pointer to its help."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (see: sugarctl help api)")


class ApiRequest:
    """What `sugarctl api` is asked to do, checked before anything is sent."""

    def __init__(self) -> None:
        self.name = ""
        self.path = "me"
        self.method = ""
        self.fields: list[tuple[str, Any, str]] = []  # (key, value, the argument as given)
        self.headers: list[tuple[str, str]] = []
        self.input: str | None = None
        self.output: str | None = None
        self.socket: str | None = None
        self.as_user: str | None = None  # Sugar's sudo: the request acts as this user
        self.include = self.paginate = self.help = False

    @property
    def body_fields(self) -> bool:
        """Whether the fields go in a JSON body (else in the query string)."""
        return bool(self.fields) and self.input is None and self.method not in QUERY_METHODS

    def header(self, name: str) -> str | None:
        for given, value in self.headers:
            if given.lower() == name:
                return value
        return None


def parse(argv: list[str]) -> ApiRequest:
    """`api`'s arguments (what follows `api` on sugarctl's command line) as an ApiRequest;
    raises Usage naming the argument that is wrong."""
    request = ApiRequest()
    positionals: list[str] = []
    words = iter(argv)
    only_positionals = False
    for word in words:
        if only_positionals or word == "-" or not word.startswith("-"):
            positionals.append(word)
            continue
        if word == "--":
            only_positionals = True
            continue
        if word in HELP:
            request.help = True
            continue
        if word in FLAGS:
            setattr(request, FLAGS[word], True)
            continue
        option, value = _option(word)
        if value is None:
            value = next(words, None)
            if value is None:
                raise Usage(f"{option} needs a value")
        _take(request, VALUED[option], value, option)
    if request.help:
        return request
    if not positionals:
        raise Usage("api needs NAME: sugarctl api NAME [PATH]")
    if len(positionals) > 2:
        raise Usage(f"api got an extra argument {positionals[2]!r}")
    if not positionals[0]:
        raise Usage(
            "NAME is empty: give an instance's name, as `sugarctl status --names` lists them"
        )
    request.name = positionals[0]
    if len(positionals) == 2:
        request.path = positionals[1]
    _check(request)
    return request


def _option(word: str) -> tuple[str, str | None]:
    """(the option, its value if given in the same word: --method=GET, -XGET, -fname=x)."""
    if word.startswith("--"):
        option, eq, value = word.partition("=")
        if option in VALUED:
            return option, value if eq else None
        if option in FLAGS and eq:
            raise Usage(f"{option} takes no value")
        raise Usage(f"unknown option {option!r}")
    option = word[:2]
    if option in VALUED:
        return option, word[2:] or None
    raise Usage(f"unknown option {word!r}")


def _take(request: ApiRequest, what: str, value: str, option: str) -> None:
    if what == "method":
        if not METHOD.fullmatch(value):
            raise Usage(f"{option} {value!r}: a method is a word, like GET, POST or PUT")
        request.method = value.upper()
    elif what in ("raw-field", "field"):
        key, eq, text = value.partition("=")
        if not eq or not key:
            raise Usage(f"{option} {value!r}: a field is KEY=VALUE")
        typed: Any = text
        if what == "field":
            try:
                typed = json.loads(text)
            except ValueError:
                raise Usage(
                    f"{option} {value!r}: the value is not JSON; a string goes with -f, "
                    f"or quoted: -F '{key}=\"{text}\"'"
                ) from None
        request.fields.append((key, typed, f"{option} {value}"))
    elif what == "header":
        name, colon, text = value.partition(":")
        if not colon or not HEADER_NAME.fullmatch(name) or any(c in text for c in "\r\n\0"):
            raise Usage(f"{option} {value!r}: a header is 'Name: value'")
        if name.lower() in OWN_HEADERS:
            raise Usage(f"{option} {value!r}: sugarctl sets {name} itself")
        request.headers.append((name, text.strip()))
    elif what == "output":
        request.output = value
    elif what == "input":
        request.input = value
    elif what == "as":
        problem = sudo_user_problem(value)  # the user-name rule, before anything is sent
        if problem is not None:
            raise Usage(f"{option} {value!r}: {problem}")
        request.as_user = value
    else:
        request.socket = value


def _check(request: ApiRequest) -> None:
    """What parse() cannot see word by word: the path, combinations, the files."""
    split_path(request.path)  # a bad PATH is refused here, before anything is sent
    if not request.method:
        # As gh api; but a --paginate is a list (GET): fields would create a record otherwise.
        sends = (request.fields or request.input is not None) and not request.paginate
        request.method = "POST" if sends else "GET"
    if request.paginate:
        if request.input is not None:
            raise Usage("--paginate sends each page's offset itself: leave out --input")
        if request.method not in PAGED_METHODS:
            raise Usage(
                f"--paginate follows next_offset of GET lists and POST filters, not of "
                f"-X {request.method}"
            )
    if request.body_fields:
        seen: dict[str, str] = {}
        for key, _, given in request.fields:
            if key in seen:
                raise Usage(f"{given!r}: field {key!r} is given twice ({seen[key]!r})")
            seen[key] = given
    if request.input is not None and request.input != "-":
        try:
            with open(request.input, "rb"):
                pass
        except OSError as exc:
            raise Usage(f"--input {request.input}: {exc.strerror}") from None
        if os.path.isdir(request.input):
            raise Usage(f"--input {request.input}: is a directory")
    if request.output is not None:
        folder = os.path.dirname(request.output) or "."
        if not os.path.isdir(folder):
            raise Usage(f"-o {request.output}: there is no folder {folder}")
        if os.path.isdir(request.output):
            raise Usage(f"-o {request.output}: is a directory; name the file to write")


def split_path(path: str) -> tuple[str | None, str, str]:
    """(the version PATH names, if any; the rest, percent-encoded; the query, if any)."""
    if "://" in path:
        raise Usage(f"PATH {path!r}: give the path after the site's /rest/, like Accounts")
    path, _, query = path.partition("?")
    rest = path.lstrip("/")
    if rest == "rest" or rest.startswith("rest/"):
        rest = rest[5:]
    segments = rest.split("/")
    for segment in segments:
        if unquote(segment) in (".", ".."):
            raise Usage(f"PATH {path!r}: no '.' or '..' segments; name the route itself")
    version = None
    if VERSION.fullmatch(segments[0]):
        version, rest = segments[0], "/".join(segments[1:])
    return version, quote(rest, safe=PATH_SAFE), query


def query_pairs(key: str, value: Any) -> Iterator[tuple[str, str]]:
    """`key=value` as PHP reads a query string (Sugar does): a list or an object as
    `key[0]=...`, `key[name]=...`, so it arrives as the array a JSON body would carry."""
    if isinstance(value, dict):
        for sub, item in value.items():
            yield from query_pairs(f"{key}[{sub}]", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from query_pairs(f"{key}[{index}]", item)
    elif isinstance(value, bool):
        yield key, "true" if value else "false"
    elif value is None:
        yield key, ""
    elif isinstance(value, str):
        yield key, value
    else:
        yield key, json.dumps(value)
