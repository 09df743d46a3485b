"""The module layout of the design (one module, one job): who may import whom. A module that
reaches past its neighbours (sugarctl pulling in aiohttp, the api talking to Sugar) fails here,
before it shows up as a slow start or a tangled change."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from support import ROOT

PACKAGE = ROOT / "sugard"

# sugard's modules each may import, beyond the standard library, after the design's table.
# Small shared helpers every layer may use: the version, the secret type, default paths, the
# wire contract (stdlib only, cheap), the observer interface (stdlib only) through which
# keeper, api and proxy report to metrics, and `text.one_line` for text from elsewhere in a
# log or status line.
SHARED = {"sugard", "secret", "paths", "wire", "observe", "text"}
ALLOWED: dict[str, tuple[set[str], set[str]]] = {
    # module: (sugard modules, third-party packages)
    # The daemon's one error tree (stdlib, the wire codes): config's, keeper's, reload's,
    # socket's and init's errors share its base; the api answers them in one place.
    "errors": ({"wire"}, set()),
    "config": (SHARED | {"errors", "values", "secrets", "instance_config", "fleet_config"}, set()),
    # The config's parts: the value checkers, the secret sources (and the one file-mode
    # check), the instance tables and the [fleet] table; each below config, stdlib only.
    "values": (SHARED | {"secrets"}, set()),
    "secrets": (SHARED, set()),
    "instance_config": (SHARED | {"values", "secrets"}, set()),
    "fleet_config": (SHARED | {"values", "secrets"}, set()),
    # What is made of a loaded config, split from `config` (which reads it in): the diff a
    # reload acts on, and the config as show-config prints it, every secret hidden.
    "config_diff": (SHARED | {"config"}, set()),
    "effective_config": (SHARED | {"config", "secrets"}, set()),
    # The TLS context for a site, built once for the Sugar client and for check's ca_file test.
    "tls": (set(), set()),
    "text": (set(), set()),
    # `sugard run`: systemd's handover, the config (reported as check reports it), the daemon.
    "start": (SHARED | {"config", "check", "daemon", "systemd"}, set()),
    "sugar": (SHARED | {"config", "outbound", "sugar_errors", "tls"}, {"aiohttp"}),
    # Sugar's error tree and the tables that choose a class for each answer: split from
    # `sugar` (the calls over aiohttp) so the translation reads in one place, stdlib only.
    "sugar_errors": (SHARED | {"config", "outbound"}, set()),
    # The way out to each site (an HTTP proxy or not): aiohttp's environment helper and its
    # URL type. Not in the design's table: split from `sugar` so the choice is made (and shown
    # by show-config and the start log) once per instance; `proxy` is the authenticating proxy.
    "outbound": (SHARED | {"config"}, {"aiohttp", "yarl"}),
    "sandbox": (SHARED | {"config"}, set()),
    # check: its test login goes through the one Sugar boundary; the daemon, through client.
    # show-config shows each instance's way out (outbound) and its effective config, in TOML
    # (tomli_w).
    "check": (
        SHARED
        | {
            "config",
            "client",
            "effective_config",
            "fleet",
            "sandbox",
            "sugar",
            "secrets",
            "tls",
            "outbound",
        },
        {"tomli_w"},
    ),
    # What requests get (a token, a check of a reported one, a forced renewal): the keeper
    # joins its supervisor's demand and waits; it never calls Sugar itself.
    "keeper": (
        SHARED
        | {
            "config",
            "errors",
            "sugar",
            "keeper_board",
            "keeper_model",
            "keeper_progress",
            "keeper_supervisor",
            "renewal_timing",
        },
        set(),
    ),
    # The one task per instance that calls Sugar (renew, check, back off with tenacity):
    # split from `keeper` so the state machine reads apart from what requests are answered.
    "keeper_supervisor": (
        SHARED
        | {
            "config",
            "sugar",
            "keeper_board",
            "keeper_model",
            "keeper_progress",
            "keeper_reports",
            "keeper_session",
            "renewal_timing",
            "backoff",
        },
        {"tenacity"},
    ),
    # What an instance has come to (state, counters, the last error) and the words for it
    # (STATUS, a 503's message, what the observer hears): changed by the supervisor only.
    "keeper_progress": (
        SHARED | {"config", "errors", "keeper_model", "keeper_session", "sugar"},
        set(),
    ),
    # The keeper's vocabulary (states, errors, the STATUS snapshot, the demand, the rejected-
    # secret rule): plain values, split from `keeper` so its class reads as the state machine.
    "keeper_model": (SHARED | {"config", "sugar"}, set()),
    # Where the keeper's requests and its supervisor meet: the one demand and the condition.
    "keeper_board": (SHARED | {"keeper_model"}, set()),
    # The session a keeper holds (its grant, refresh and refused tokens, what it learned of
    # the server), replaced only through its methods: split from `keeper`, which decides.
    "keeper_session": (
        SHARED | {"config", "keeper_reports", "renewal_timing", "sugar"},
        set(),
    ),
    # When the keeper renews, probes and serves: pure functions of a grant, the settings and
    # the clock (docs/lifecycle.md's rules), split from `keeper`, which holds the state.
    "renewal_timing": (SHARED | {"config", "sugar"}, set()),
    # What the keeper tells the observer of its calls to Sugar (each counted by its answer).
    "keeper_reports": (SHARED | {"keeper_model", "sugar"}, set()),
    # The wait between failed renewals (tenacity's policy), split from `keeper` likewise.
    "backoff": (SHARED | {"renewal_timing", "sugar"}, {"tenacity"}),
    # fleet: its source (fleet/source.py) is the keeper's SugarClient, gated by the lease.
    # A package whose rooms are each held to this row: errors, sealing, store, lease (the
    # leader's deadline), member (one instance's seat), hub (the daemon's Fleet of seats, the
    # pub/sub listener), source, online; FLEET_ROOMS below pins who imports whom inside it.
    "fleet": (SHARED | {"config", "sugar"}, {"redis", "cryptography", "aiohttp"}),
    # api: the /v1 routes (and the proxy's on the socket), thin over the keepers; serving
    # admits connections and knows each one's peer; peer is who connects and the policy.
    "api": (
        SHARED | {"api_middleware", "errors", "keeper", "openapi", "peer", "proxy", "serving"},
        {"aiohttp"},
    ),
    # What every /v1 request passes through (the peer check, JSON for aiohttp's errors) and
    # what routes parse it with (query seconds, a JSON body): split from `api` to keep it thin.
    "api_middleware": (SHARED | {"peer", "proxy", "serving"}, {"aiohttp"}),
    "serving": ({"peer", "wire"}, {"aiohttp"}),
    # proxy: Sugar through sugard, on the keeper's session (config: the instance's settings).
    # A package of four rooms, each held to this row: forward (the forwarding core), answers
    # (sugard's own answers in Sugar's envelope), routes (on the socket), listener (loopback TCP).
    "proxy": (SHARED | {"config", "keeper"}, {"aiohttp", "yarl"}),
    "openapi": (SHARED | {"openapi_schemas"}, set()),
    # The OpenAPI document's components (every body's schema), apart from its paths.
    "openapi_schemas": (SHARED, set()),
    "peer": (set(), set()),  # stdlib only: the policy is a pure function of the config
    "systemd": ({"text"}, set()),
    # The socket API's contract both ends share: stdlib only, cheap enough for sugarctl.
    "wire": (set(), set()),
    "paths": ({"wire"}, set()),
    "client": ({"client_http", "wire"}, set()),
    # The client's bytes on the socket (HTTP/1.1 and JSON from C modules): split from
    # `client` (the API and its error tree); loaded by `sugarctl token`, so stdlib only.
    "client_http": (set(), set()),
    "ctl": (
        {
            "sugard",
            "client",
            "wire",
            "ctl_help",
            "ctl_status",
            "ctl_completion",
            "ctl_daemon",
            "ctl_errors",
        },
        set(),
    ),
    # sugarctl's parts loaded only when asked for (help, the status table, completion, the
    # commands about the daemon itself, the words for a failure), so that a `sugarctl token`
    # that works does not load them: stdlib and the client side only. ctl_daemon shares
    # ctl's shell quoting (the env line and `token --format env` quote alike).
    "ctl_help": ({"wire"}, set()),
    "ctl_status": ({"client", "wire"}, set()),
    "ctl_completion": ({"ctl", "ctl_help"}, set()),
    "ctl_daemon": ({"client", "ctl", "wire"}, set()),
    "ctl_errors": ({"client"}, set()),
    "auth": ({"client"}, set()),
    "testing": ({"testing"}, {"aiohttp"}),
    "observe": (set(), set()),
    "metrics": (SHARED, {"prometheus_client"}),
    "events": (SHARED, set()),
    # `sugard init`'s flags, apart from what they do; its questions on the terminal; files
    # written 0600 in a 0700 directory (the config and its secrets, by init and demo). Split
    # from `init` (building and writing the config) to keep each to one job.
    "init_args": (set(), set()),
    "init_prompt": (set(), set()),
    # `sugard init`'s answers from flags and questions (and the session clash check): split
    # from `init`, which builds and writes the config from them.
    "init_answers": (SHARED | {"config", "errors", "init_prompt"}, set()),
    "private_files": (set(), set()),
    # The sessions a restart keeps: a keeper's grant, for an instance's settings, through
    # systemd's fd store. Split from `daemon` so the memfd format has a module of its own.
    "handoff": (SHARED | {"config", "keeper", "systemd"}, set()),
    # The daemon's Unix socket (directory, lock, stale probe, bind, activation adoption):
    # split from `daemon`, stdlib only, so the socket's rules read in one place.
    "sockets": (SHARED | {"errors", "systemd"}, set()),
    # What a reload does (add, remove, adopt, restart), decided as a pure function of the
    # configs and the running keepers: split from `daemon` so it is tested without one.
    "reload_plan": (SHARED | {"config", "config_diff", "keeper"}, set()),
    # Carrying that plan out around the daemon's swap (the new config read off the loop, its
    # keepers built aside, the retired stopped before the fresh start): split from `daemon`
    # so its reload reads as its steps; the swap itself stays the daemon's.
    "reload_apply": (
        SHARED | {"config", "config_diff", "daemon_report", "errors", "keeper", "reload_plan"},
        set(),
    ),
    # The proxy's TCP listeners, opened before a reload's swap and closed after it; and the
    # daemon's side of a restart that keeps the sessions. Both split from `daemon`.
    "listeners": (SHARED | {"config", "errors", "peer", "proxy"}, set()),
    "kept_sessions": (SHARED | {"config", "handoff", "keeper", "systemd"}, set()),
    # A rejected secret kept in the fd store the moment it is rejected (a crash gives no
    # later chance), so the next sugard does not send it: split from `daemon` like the above.
    "kept_rejections": (SHARED | {"config", "handoff", "keeper", "systemd"}, set()),
    # More of the daemon's parts, split from `daemon` so its start, reload and stop read as
    # their steps: the TCP `/metrics` site (the api's handler); joining fleet mode (which
    # imports sugard.fleet, and so redis and cryptography, only when [fleet] is on); the
    # graceful stop of its servers; what it says of its instances in the log and STATUS=.
    "metrics_site": (SHARED | {"api", "config", "errors"}, {"aiohttp"}),
    "fleet_seats": (SHARED | {"config", "fleet", "keeper", "sugar"}, {"aiohttp"}),
    "shutdown": (SHARED | {"config"}, {"aiohttp"}),
    "daemon_report": (SHARED | {"config", "config_diff", "keeper", "outbound"}, set()),
}


# Inside the fleet package, who may import whom at run time (imports only for types, under
# `if TYPE_CHECKING:`, are not counted): each room sees only those below it, so the seat
# (member) never loads the hub that runs it, and the lease and the errors stand alone.
FLEET_ROOMS: dict[str, set[str]] = {
    "errors": set(),
    "sealing": {"errors"},
    "store": {"errors", "sealing"},
    "lease": set(),  # the leader's deadline rule, stdlib only
    "member": {"errors", "lease", "sealing", "store"},  # one instance's seat
    "hub": {"errors", "lease", "member", "sealing", "store"},  # the daemon's Fleet of seats
    "source": {"errors", "member", "sealing", "store"},
    "online": {"errors", "sealing", "store"},
    "__init__": {"errors", "hub", "lease", "member", "online", "sealing", "store"},
}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(sugard modules, third-party top-level packages) that `path` imports, lazily or not."""
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            module = node.module or ""
            if module:
                ours.add(module.split(".")[0])
            else:  # `from . import x`: the package itself, or its submodule x
                ours.update(
                    a.name if (path.parent / f"{a.name}.py").exists() else "sugard"
                    for a in node.names
                )
            continue
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            top, _, rest = name.partition(".")
            if top == "sugard":
                ours.add(rest.split(".")[0] if rest else "sugard")
            elif top not in sys.stdlib_module_names and top != "__future__":
                theirs.add(top)
    return ours, theirs


def test_each_module_imports_only_what_the_design_allows() -> None:
    broken = []
    for module, (our_allowed, their_allowed) in ALLOWED.items():
        files = (
            [PACKAGE / f"{module}.py"]
            if (PACKAGE / f"{module}.py").exists()
            else sorted((PACKAGE / module).glob("*.py"))
        )
        assert files, module
        for path in files:
            ours, theirs = imports_of(path)
            ours.discard(module)
            if ours - our_allowed or theirs - their_allowed:
                broken.append(
                    f"{path.name}: {sorted(ours - our_allowed)} {sorted(theirs - their_allowed)}"
                )
    assert [] == broken


def fleet_rooms_imported_by(path: Path) -> set[str]:
    """The fleet rooms that `path` imports at run time (not under `if TYPE_CHECKING:`)."""
    rooms: set[str] = set()
    nodes: list[ast.AST] = [ast.parse(path.read_text())]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and module:
                rooms.add(module.split(".")[0])
            elif module.startswith("sugard.fleet."):
                rooms.add(module.split(".")[2])
        nodes.extend(ast.iter_child_nodes(node))
    return rooms


def test_each_fleet_room_imports_only_the_rooms_below_it() -> None:
    files = {path.stem: path for path in (PACKAGE / "fleet").glob("*.py")}
    assert set(FLEET_ROOMS) == set(files)
    broken = {
        room: sorted(fleet_rooms_imported_by(files[room]) - allowed)
        for room, allowed in FLEET_ROOMS.items()
        if fleet_rooms_imported_by(files[room]) - allowed
    }
    assert {} == broken
    # member names the hub for its types only: the checker passes it because it skips the
    # TYPE_CHECKING block, not because it missed the import.
    assert "from sugard.fleet.hub import Fleet" in files["member"].read_text()


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The check above can fail: a client module importing aiohttp and the daemon is caught."""
    bad = tmp_path / "client.py"
    bad.write_text("import aiohttp\nfrom .daemon import Daemon\nfrom . import __version__\n")
    assert ({"daemon", "sugard"}, {"aiohttp"}) == imports_of(bad)


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
