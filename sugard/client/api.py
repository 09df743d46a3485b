"""`sugarctl api NAME [PATH] ...`: Sugar's REST API from the shell, through sugard.

The request goes over the daemon's socket to its proxy route (`/v1/instances/NAME/rest/...`),
so sugard adds the token there and the token never enters this process; the 401 rule (renew,
replay once) and whatever else the proxy does apply on the daemon's side. Bodies stream both
ways: `--input` a file or stdin, `-o` a download of any size, in constant memory.

Loaded by sugard.client.ctl only when the `api` command runs; its arguments are read and
checked by sugard.client.api_args, this module sends them and puts the answer out.
"""

from __future__ import annotations

import json
import mimetypes
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any
from urllib.parse import urlencode

from sugard.client import SugardClient, SugardError, proxy_path
from sugard.client.api_args import ApiRequest, Usage, parse, query_pairs, split_path
from sugard.client.ctl import stdout_gone
from sugard.client.transport import Closed, Connection, reusable
from sugard.wire import (
    EXIT_ATTENTION,
    EXIT_DENIED,
    EXIT_INTERRUPTED,
    EXIT_SUGAR,
    EXIT_UNAVAILABLE,
    EXIT_UNEXPECTED,
    EXIT_UNKNOWN,
    EXIT_USAGE,
    PROXY_ERROR_HEADER,
)

__all__ = ["main"]

CHUNK = 256 * 1024
MAX_ERROR_BODY = 1024 * 1024  # an error answer is read whole (for its stderr line) up to this
MAX_PRETTY = 16 * 1024 * 1024  # JSON larger than this goes to a terminal as it came
MAX_PAGE = 256 * 1024 * 1024  # one page of a list, read whole to split it into records
ERROR_HEADER = PROXY_ERROR_HEADER.lower().encode()


# The query string


def _query(given: str, pairs: Iterable[tuple[str, str]]) -> str:
    encoded = urlencode(list(pairs))
    return "&".join(part for part in (given, encoded) if part)


# Talking to the daemon


class _Answer:
    """One answer's head, and its body to read."""

    def __init__(
        self, conn: Connection, status: int, line: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.conn = conn
        self.status = status
        self.line = line
        self.pairs = headers
        self.headers = {name.lower(): value for name, value in headers}

    @property
    def json(self) -> bool:
        kind = self.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        return kind == b"application/json" or kind.endswith(b"+json")

    @property
    def own_error(self) -> str | None:
        """sugard's own error label, when sugard answered rather than Sugar."""
        label = self.headers.get(ERROR_HEADER)
        return label.decode("ascii", "replace") if label is not None else None

    def chunks(self, method: str) -> Iterator[bytes]:
        if method == "HEAD" or self.status in (204, 304):
            return iter(())
        return self.conn.body_chunks(self.headers)

    def gather(self, method: str, limit: int) -> tuple[bytes, Iterator[bytes] | None]:
        """The body read into memory up to `limit` bytes, and what is left of it to read
        (None: nothing, the body is whole)."""
        length = self.headers.get(b"content-length")
        chunks = self.chunks(method)
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", chunks
        data = bytearray()
        for chunk in _guarded(chunks):
            data += chunk
            if len(data) > limit:
                return bytes(data), chunks
        return bytes(data), None

    def read(self, method: str, limit: int) -> bytes:
        """The whole body, which must be at most `limit` bytes."""
        data, rest = self.gather(method, limit)
        if rest is not None:
            raise _BrokeOff(f"the answer is larger than {limit // (1024 * 1024)} MiB")
        return data

    def head_text(self) -> bytes:
        lines = [self.line] + [name + b": " + value for name, value in self.pairs]
        return b"\n".join(lines) + b"\n\n"


class _BrokeOff(SugardError):
    """The answer broke off, or made no sense, before its end."""


def _guarded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks`, with a body that breaks off said as such."""
    try:
        yield from chunks
    except (ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise _BrokeOff(
            f"the answer broke off before its end ({_why(exc)}); nothing whole was received"
        ) from None


class _Session:
    """The requests of one `sugarctl api` run, on one kept connection where it can be."""

    def __init__(self, client: SugardClient) -> None:
        self.client = client
        self.conn: Connection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(
        self, method: str, target: str, headers: list[tuple[str, str]], body: _Body
    ) -> _Answer:
        kept = self.conn is not None
        if self.conn is None:
            self.conn = self.client._connect()
        conn = self.conn
        conn.sock.settimeout(None)  # sugard bounds the wait for Sugar (proxy_timeout)
        head = [f"{method} {target} HTTP/1.1", "Host: sugard", *(f"{k}: {v}" for k, v in headers)]
        framing = body.framing()
        if not framing and method not in ("GET", "HEAD"):
            framing = ["Content-Length: 0"]  # said, for a POST or PUT without a body
        head += framing
        try:
            conn.send(("\r\n".join(head) + "\r\n\r\n").encode("utf-8"))
            for piece in body.pieces():
                conn.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            # sugard answered before reading it all (a refusal): that answer says why.
            pass
        try:
            status, line, pairs = conn.read_head()
        except Closed:
            self.close()
            if kept and body.stream is None:
                # sugard closed the kept connection meanwhile (idle), before the request
                # reached it: the same request again, on a new one.
                return self.send(method, target, headers, body)
            raise _BrokeOff(
                f"sugard on {self.client.socket_path} closed the connection without an answer; "
                "see its log (journalctl --user -u sugard)"
            ) from None
        except (ValueError, OSError) as exc:
            self.close()
            raise _BrokeOff(f"sugard sent no proper answer ({_why(exc)})") from None
        return _Answer(conn, status, line, pairs)

    def done(self, answer: _Answer) -> None:
        """`answer`'s body is read: keep the connection for the next request if it can be."""
        if not reusable(answer.line, answer.headers):
            self.close()


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class _Body:
    """A request's body: none, bytes, or a file or stdin streamed."""

    def __init__(
        self, data: bytes | None = None, stream: IO[bytes] | None = None, first: bytes = b""
    ) -> None:
        self.data = data
        self.stream = stream
        self.first = first  # what was read of the stream already (to guess its type)
        self.length: int | None = None
        if stream is not None:
            try:
                info = os.fstat(stream.fileno())
            except (OSError, ValueError):
                info = None
            if info is not None and stat.S_ISREG(info.st_mode):
                self.length = info.st_size - stream.tell() + len(first)

    def framing(self) -> list[str]:
        if self.data is not None:
            return [f"Content-Length: {len(self.data)}"]
        if self.stream is None:
            return []
        if self.length is not None:
            return [f"Content-Length: {self.length}"]
        return ["Transfer-Encoding: chunked"]

    def pieces(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        if self.stream is None:
            return
        chunked = self.length is None
        piece = self.first
        while True:
            if piece:
                yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            piece = self.stream.read(CHUNK)
            if not piece:
                break
        if chunked:
            yield b"0\r\n\r\n"


# Output


class _Output:
    """Where the body goes: stdout, or the -o file (written aside, then moved in place whole)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._temp: IO[bytes] | None = None
        self.last = b"\n"

    @property
    def terminal(self) -> bool:
        return self.path is None and sys.stdout.isatty()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.path is None:
            sys.stdout.buffer.write(data)
        else:
            if self._temp is None:
                folder, name = os.path.split(self.path)
                self._temp = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept across writes
                    dir=folder or ".", prefix=f".{name}.", delete=False
                )
            self._temp.write(data)
        self.last = data[-1:]

    def finish(self) -> None:
        if self.path is None:
            sys.stdout.buffer.flush()
            return
        if self._temp is None:
            with open(self.path, "wb"):  # an empty answer: an empty file
                return
        self._temp.close()
        os.replace(self._temp.name, self.path)
        self._temp = None

    def abandon(self) -> None:
        if self._temp is not None:
            self._temp.close()
            os.unlink(self._temp.name)
            self._temp = None


# The command


def main(argv: list[str], socket: str | None = None) -> int:
    """Run `sugarctl api` with its arguments; the exit code."""
    from sugard.client.commands import report

    try:
        request = parse(argv)
    except Usage as exc:
        print(f"sugarctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if request.help:
        from sugard.client.help import command_help

        print(command_help("api"), end="")
        return 0
    client = SugardClient(request.socket or socket)
    session = _Session(client)
    output = _Output(request.output)
    try:
        code = _run(request, client, session, output)
        output.finish()
        return code
    except SugardError as exc:
        output.abandon()
        return report(exc, "api", None)
    except KeyboardInterrupt:
        output.abandon()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return stdout_gone()
    finally:
        session.close()
        client.close()


def _run(request: ApiRequest, client: SugardClient, session: _Session, output: _Output) -> int:
    version, rest, query = split_path(request.path)
    if version is None:
        urls = client.proxy_urls(request.name)
        version = str(urls.get("api_version") or "v10")
    base = proxy_path(request.name, request.as_user) + f"/rest/{version}/{rest}"
    headers = list(request.headers)
    body = _Body()
    pairs: list[tuple[str, str]] = []
    payload: dict[str, Any] = {}
    if request.body_fields:
        payload = {key: value for key, value, _ in request.fields}
        body = _Body(json.dumps(payload).encode())
        if request.header("content-type") is None:
            headers.append(("Content-Type", "application/json"))
    else:
        pairs = [pair for key, value, _ in request.fields for pair in query_pairs(key, value)]
    if request.input is not None:
        body = _input_body(request.input)
        if request.header("content-type") is None:
            headers.append(("Content-Type", _content_type(request.input, body.first)))
    if request.paginate:
        return _paginate(request, session, output, base, query, pairs, payload, headers)
    target = base + _question(_query(query, pairs))
    answer = session.send(request.method, target, headers, body)
    return _deliver(request, session, output, answer)


def _question(query: str) -> str:
    return f"?{query}" if query else ""


def _input_body(path: str) -> _Body:
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    first = stream.read(CHUNK) if path == "-" else b""
    return _Body(stream=stream, first=first)


def _content_type(path: str, first: bytes) -> str:
    """The type of --input: by the file's name, else by its first bytes (JSON or not)."""
    if path != "-":
        guessed, _ = mimetypes.guess_type(path)
        if guessed:
            return guessed
        with open(path, "rb") as f:
            first = f.read(CHUNK)
    return "application/json" if first.lstrip()[:1] in (b"{", b"[") else "application/octet-stream"


def _deliver(request: ApiRequest, session: _Session, output: _Output, answer: _Answer) -> int:
    """Put one answer out: head (-i), body, and for a status of 400 or more the stderr line."""
    own = answer.own_error
    if own is not None and answer.status >= 400:
        return _own_failure(session, answer, request.method, own)
    if request.include:
        sys.stdout.buffer.write(answer.head_text())
    chunks = answer.chunks(request.method)
    if answer.status >= 400 or (output.terminal and answer.json):
        limit = MAX_ERROR_BODY if answer.status >= 400 else MAX_PRETTY
        whole, rest = answer.gather(request.method, limit)
        if rest is None:
            session.done(answer)
            output.write(_shown(whole, answer.json, output.terminal))
            _end_line(output, answer.json)
            if answer.status >= 400:
                print(f"sugarctl: {_sugar_error(answer.status, whole)}", file=sys.stderr)
                return EXIT_SUGAR
            return 0
        output.write(whole)  # too large to show otherwise: as it came
        chunks = rest
    for chunk in _guarded(chunks):
        output.write(chunk)
    session.done(answer)
    _end_line(output, answer.json)
    if answer.status >= 400:
        print(f"sugarctl: Sugar answered HTTP {answer.status}", file=sys.stderr)
        return EXIT_SUGAR
    return 0


def _end_line(output: _Output, is_json: bool) -> None:
    # JSON on stdout ends with a line break, as shell tools expect; a file keeps its bytes.
    if is_json and output.path is None and output.last != b"\n":
        output.write(b"\n")


def _shown(raw: bytes, is_json: bool, terminal: bool) -> bytes:
    if not (is_json and terminal):
        return raw
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _sugar_error(status: int, raw: bytes) -> str:
    """Sugar's error answer in one line: the status, its `error` and `error_message`."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data.get("error_message")
        said = f": {' '.join(str(message).split())}" if message else ""
        return f"Sugar answered {status} {data['error']}{said}"
    return f"Sugar answered {status} (not JSON: {len(raw)} bytes on stdout)"


# sugard's own failures keep the exit codes every sugarctl command uses for them.
OWN_FAILURES = {
    400: EXIT_USAGE,  # a path sugard does not forward
    403: EXIT_DENIED,  # this uid may not use the instance, or an oauth2 route
    404: EXIT_UNKNOWN,  # no such instance
    429: EXIT_UNAVAILABLE,  # sugard holds requests back: try again later
    502: EXIT_UNAVAILABLE,  # Sugar out of reach
    503: EXIT_UNAVAILABLE,  # no token now
    504: EXIT_UNAVAILABLE,  # Sugar did not answer in time
}


def _own_failure(session: _Session, answer: _Answer, method: str, label: str) -> int:
    raw, rest = answer.gather(method, MAX_ERROR_BODY)
    if rest is None:
        session.done(answer)
    else:
        session.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    message = data.get("error_message") if isinstance(data, dict) else None
    print(f"sugarctl: {' '.join(str(message or label).split())}", file=sys.stderr)
    if label == "upstream_rejected":
        return EXIT_ATTENTION
    return OWN_FAILURES.get(answer.status, EXIT_UNEXPECTED)


def _paginate(
    request: ApiRequest,
    session: _Session,
    output: _Output,
    base: str,
    query: str,
    pairs: list[tuple[str, str]],
    payload: dict[str, Any],
    headers: list[tuple[str, str]],
) -> int:
    """Follow next_offset until it is -1, one record a line (JSON lines)."""
    offset: int | None = None
    first = True
    no_type = request.header("content-type") is None and not request.body_fields
    if request.method == "POST" and no_type:  # with body fields, _run set it
        headers = [*headers, ("Content-Type", "application/json")]
    while True:
        if request.method == "GET":
            paged = [p for p in pairs if p[0] != "offset"]
            if offset is not None:
                paged.append(("offset", str(offset)))
            target, body = base + _question(_query(query, paged)), _Body()
        else:
            page = payload if offset is None else {**payload, "offset": offset}
            target, body = base + _question(query), _Body(json.dumps(page).encode())
        answer = session.send(request.method, target, headers, body)
        if answer.status >= 400 or answer.own_error is not None:
            return _deliver(request, session, output, answer)
        if request.include:
            sys.stdout.buffer.write(answer.head_text())
        raw = answer.read(request.method, MAX_PAGE)
        session.done(answer)
        listed = _list_answer(raw)
        if listed is None:
            if not first:
                raise _BrokeOff("--paginate: a later page was not a list answer")
            output.write(raw or b"")
            _end_line(output, answer.json)
            print(
                "sugarctl: --paginate: the answer has no records and next_offset; printed as it "
                "came",
                file=sys.stderr,
            )
            return 0
        records, next_offset = listed
        for record in records:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            output.write(line.encode() + b"\n")
        if next_offset < 0:
            return 0
        if offset is not None and next_offset <= offset:
            raise _BrokeOff(f"--paginate: next_offset {next_offset} does not move on from {offset}")
        offset, first = next_offset, False


def _list_answer(raw: bytes | None) -> tuple[list[Any], int] | None:
    """(records, next_offset) of a list or filter answer; None for any other answer."""
    try:
        data = json.loads(raw or b"")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    records, next_offset = data.get("records"), data.get("next_offset")
    if isinstance(records, list) and isinstance(next_offset, int):
        return records, next_offset
    return None
