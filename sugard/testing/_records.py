"""The fake SugarCRM's records: an in-memory store per module and Sugar's filter language.

Kept apart from HTTP so the rules read as plain code: how Sugar's FilterApi reads a filter
definition (a list of objects, each key a field or `$and`/`$or`, an operand object or a bare value
meaning `$equals`), how it pages (`max_num`, `offset`, `next_offset`), orders (`order_by`,
default `date_modified` newest first) and trims fields (`fields`, always with `id` and
`date_modified`). Sugar compares strings under MySQL's default case-insensitive collation,
so the fake does too. There are no vardefs: any field name is accepted, and a field a record
lacks reads as null. Not thread-safe on purpose: `FakeSugar` holds its one lock around every call.
"""

from __future__ import annotations

import copy
import itertools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

JsonRecord = dict[str, Any]
Filter = Callable[[JsonRecord], bool]

DEFAULT_MAX_NUM: Final = 20
MODULE_RE: Final = re.compile(r"[A-Z][A-Za-z0-9_]*")
# Fields the client may not set through a create or an update: Sugar keeps them itself.
_MANAGED: Final = frozenset({"date_entered", "date_modified", "_module", "deleted"})
_ALWAYS_RETURNED: Final = ("id", "date_modified")
_PHP_KEY_RE: Final = re.compile(r"\[([^\]]*)\]")


class InvalidParameter(ValueError):
    """A request argument Sugar refuses with 422 `invalid_parameter`; the text is Sugar's."""


class RecordExists(InvalidParameter):
    """A create with an `id` that is already taken."""


def sugar_time(epoch: float) -> str:
    """A datetime as Sugar's API prints it: ISO 8601 to the second, with the UTC offset."""
    return datetime.fromtimestamp(int(epoch), UTC).isoformat(timespec="seconds")


@dataclass
class _Row:
    data: JsonRecord
    modified: int  # order of the last write, to break ties between equal date_modified


@dataclass
class RecordStore:
    """Every module's records, by id, in the order they were created."""

    clock: Callable[[], float]
    _modules: dict[str, dict[str, _Row]] = field(default_factory=dict)
    _writes: itertools.count[int] = field(default_factory=itertools.count)

    def seed(self, records: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Load records as they would be after a create; missing ids and dates are filled in."""
        if not isinstance(records, Mapping):
            raise ValueError('records must map module names to lists: {"Accounts": [...]}')
        for module, rows in records.items():
            if not isinstance(module, str) or not MODULE_RE.fullmatch(module):
                raise ValueError(f"module name {module!r} must look like Accounts or My_Module")
            if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Iterable):
                raise ValueError(f"records for {module} must be a list of objects")
            for row in rows:
                if not isinstance(row, Mapping):
                    raise ValueError(f"each record for {module} must be an object, got {row!r}")
                stamp = sugar_time(self.clock())
                data = {"date_entered": stamp, "date_modified": stamp} | copy.deepcopy(dict(row))
                self._insert(module, data)

    def create(self, module: str, values: Mapping[str, Any]) -> JsonRecord:
        """A new record from a create body; an `id` in it is kept unless it is taken."""
        wanted = values.get("id")
        if wanted and wanted in self._modules.get(module, {}):
            raise RecordExists(f"Record already exists: {wanted} in module: {module}")
        stamp = sugar_time(self.clock())
        data = _settable(values) | {"date_entered": stamp, "date_modified": stamp}
        if wanted:
            data["id"] = str(wanted)
        return self._insert(module, data)

    def get(self, module: str, record_id: str) -> JsonRecord | None:
        """One record as the API shows it, or None."""
        row = self._modules.get(module, {}).get(record_id)
        return None if row is None else _shown(module, row.data)

    def update(self, module: str, record_id: str, values: Mapping[str, Any]) -> JsonRecord | None:
        """Change some fields (not the id) and date_modified; None if there is no such record."""
        row = self._modules.get(module, {}).get(record_id)
        if row is None:
            return None
        changes = {k: v for k, v in _settable(values).items() if k != "id"}
        row.data.update(changes, date_modified=sugar_time(self.clock()))
        row.modified = next(self._writes)
        return _shown(module, row.data)

    def delete(self, module: str, record_id: str) -> bool:
        """Remove a record; False if there was none."""
        return self._modules.get(module, {}).pop(record_id, None) is not None

    def records(self, module: str) -> list[JsonRecord]:
        """Every record of a module in creation order, as the API shows them."""
        return [_shown(module, row.data) for row in self._modules.get(module, {}).values()]

    def modules(self) -> list[str]:
        """The modules that hold or held records."""
        return list(self._modules)

    def query(self, module: str, args: Mapping[str, Any]) -> tuple[list[JsonRecord], int]:
        """(the page of records, next_offset) for a list or filter request's arguments."""
        rows = self._matching(module, args)
        limit = _php_int(args.get("max_num")) or DEFAULT_MAX_NUM
        offset = _php_int(args.get("offset"))
        if limit < 0:  # Sugar: a negative limit means no limit
            page, next_offset = rows[offset:], -1
        else:
            page = rows[offset : offset + limit]
            next_offset = offset + limit if len(rows) > offset + limit else -1
        fields = _fields(args.get("fields"))
        return [_shown(module, row.data, fields) for row in page], next_offset

    def count(self, module: str, args: Mapping[str, Any]) -> int:
        """How many records a filter matches (paging arguments do not count)."""
        return len(self._matching(module, args))

    def _insert(self, module: str, data: JsonRecord) -> JsonRecord:
        record_id = str(data.pop("id", None) or uuid.uuid4())
        data = {"id": record_id, **data}
        self._modules.setdefault(module, {})[data["id"]] = _Row(data, next(self._writes))
        return _shown(module, data)

    def _matching(self, module: str, args: Mapping[str, Any]) -> list[_Row]:
        keep = compile_filter(args.get("filter"))
        rows = [row for row in self._modules.get(module, {}).values() if keep(row.data)]
        order = parse_order_by(args.get("order_by"))
        if not order:
            # Sugar's default order; among equal seconds, the later write first.
            rows.sort(key=lambda r: (str(r.data.get("date_modified", "")), r.modified))
            rows.reverse()
            return rows
        for name, ascending in reversed(order):  # stable sorts, last key first
            rows.sort(key=_by_field(name), reverse=not ascending)
        return rows


def _by_field(name: str) -> Callable[[_Row], tuple[int, Any]]:
    return lambda row: _sort_key(row.data.get(name))


def _settable(values: Mapping[str, Any]) -> JsonRecord:
    return {k: v for k, v in values.items() if k not in _MANAGED}


def _shown(module: str, data: JsonRecord, fields: list[str] | None = None) -> JsonRecord:
    """A copy of a record as the API returns it: `_module` added, trimmed to `fields`."""
    if fields is None:
        shown = dict(data)
    else:
        wanted = [*fields, *(f for f in _ALWAYS_RETURNED if f not in fields)]
        shown = {name: data[name] for name in wanted if name in data}
    shown["_module"] = module
    # Deep, so that a test editing what records() returned never edits the store.
    return copy.deepcopy(shown)


def _fields(value: object) -> list[str] | None:
    """`fields` as Sugar takes it: "a,b" or a JSON list; None or empty means every field."""
    if not value:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    items = as_array(value)
    if items is None or not all(isinstance(item, str) for item in items):
        raise InvalidParameter(f"Fields must be string or array, {_php_type(value)} is given")
    return items


def parse_order_by(value: object) -> list[tuple[str, bool]]:
    """`order_by=name:desc,id` as [(field, ascending)]; anything but "desc" is ascending."""
    if not isinstance(value, str) or not value:
        return []
    order: dict[str, bool] = {}
    for column in value.split(","):
        name, _, direction = column.partition(":")
        # The first mention of a field wins, as in Sugar.
        order.setdefault(name.strip(), direction.strip().lower() != "desc")
    return list(order.items())


def _sort_key(value: object) -> tuple[int, Any]:
    # MySQL puts NULL first in ascending order; numbers sort as numbers, text case-blind.
    if value is None or value == "":
        return (0, "")
    number = _number(value)
    if number is not None:
        return (1, number)
    return (2, str(value).casefold())


# ---------------------------------------------------------------- the filter language


def compile_filter(definition: object) -> Filter:
    """Sugar's filter definition as a predicate; raises InvalidParameter as Sugar would."""
    if definition is None or definition == "":
        return lambda record: True
    clauses = as_array(definition)
    if clauses is None:
        raise InvalidParameter(f"Unexpected filter type {_php_type(definition)}.")
    return _all_of(clauses)


def _all_of(clauses: list[Any]) -> Filter:
    tests = [test for clause in clauses for test in _clause(clause)]
    return lambda record: all(test(record) for test in tests)


def _any_of(clauses: list[Any]) -> Filter:
    tests = [_all_of([clause]) for clause in clauses]
    return lambda record: any(test(record) for test in tests)


def _clause(clause: object) -> list[Filter]:
    if not isinstance(clause, Mapping):
        raise InvalidParameter(f"Did not recognize the definition: {clause}")
    tests = []
    for name, spec in clause.items():
        if name in ("$and", "$or"):
            parts = as_array(spec)
            if parts is None:
                raise InvalidParameter(f"Did not recognize the definition: {spec}")
            tests.append(_all_of(parts) if name == "$and" else _any_of(parts))
        elif name.startswith("$"):
            # $owner, $favorite, $tracker and the like need Sugar's users and trackers.
            raise InvalidParameter(f"Unknown field {name}")
        else:
            tests.extend(_field_tests(name, spec))
    return tests


def _field_tests(name: str, spec: object) -> list[Filter]:
    if isinstance(spec, list):  # a PHP array with keys 0, 1, ...: read as operators, refused
        spec = {str(i): item for i, item in enumerate(spec)}
    operands = spec if isinstance(spec, Mapping) else {"$equals": spec}
    return [_on_field(name, _operator(op, operand)) for op, operand in operands.items()]


def _on_field(name: str, test: Callable[[Any], bool]) -> Filter:
    return lambda record: test(record.get(name))


def _operator(op: str, operand: Any) -> Callable[[Any], bool]:
    """One operator as a test of a field's value; the errors are Sugar's own texts."""
    if op in ("$in", "$not_in"):
        items = as_array(operand)
        if items is None:
            raise InvalidParameter(f"{op} requires an array")
        inside = any if op == "$in" else _none_of
        return lambda value: inside(_equal(value, item) for item in items)
    if op in ("$between", "$dateBetween"):
        bounds = as_array(operand)
        if bounds is None or len(bounds) != 2:
            raise InvalidParameter("$between requires an array with two values.")
        low, high = bounds
        return lambda value: _compare(value, low) >= 0 and _compare(value, high) <= 0
    simple = _SIMPLE.get(op)
    if simple is None:
        raise InvalidParameter(f"Did not recognize the operand: {op}")
    return lambda value: simple(value, operand)


def _none_of(results: Iterable[bool]) -> bool:
    return not any(results)


def _text(value: object) -> str:
    return "" if value is None else _scalar_text(value).casefold()


def _scalar_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _equal(value: object, operand: object) -> bool:
    if value is None:
        return False  # SQL: NULL equals nothing
    left, right = _number(value), _number(operand)
    if left is not None and right is not None:
        return left == right
    return _text(value) == _text(operand)


def _compare(value: object, operand: object) -> int:
    """-1, 0 or 1; a null value compares below everything, so no range admits it."""
    if value is None:
        return -2
    left, right = _number(value), _number(operand)
    pair: tuple[Any, Any] = (left, right)
    if left is None or right is None:
        pair = (_text(value), _text(operand))
    return int(pair[0] > pair[1]) - int(pair[0] < pair[1])


def _ordered(test: Callable[[int], bool]) -> Callable[[Any, Any], bool]:
    return lambda value, operand: value is not None and test(_compare(value, operand))


_SIMPLE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "$equals": _equal,
    "$not_equals": lambda value, operand: value is not None and not _equal(value, operand),
    "$starts": lambda value, operand: value is not None and _text(value).startswith(_text(operand)),
    "$ends": lambda value, operand: value is not None and _text(value).endswith(_text(operand)),
    "$contains": lambda value, operand: value is not None and _text(operand) in _text(value),
    "$not_contains": lambda value, operand: value is None or _text(operand) not in _text(value),
    "$is_null": lambda value, _: value is None,
    "$not_null": lambda value, _: value is not None,
    "$empty": lambda value, _: value is None or value == "",
    "$not_empty": lambda value, _: value is not None and value != "",
    "$gt": _ordered(lambda c: c > 0),
    "$gte": _ordered(lambda c: c >= 0),
    "$lt": _ordered(lambda c: c < 0),
    "$lte": _ordered(lambda c: c <= 0),
}


# ---------------------------------------------------------------- PHP's view of arguments


def as_array(value: object) -> list[Any] | None:
    """A JSON list, or an object (PHP arrays are both), as a list; None for anything else."""
    if isinstance(value, list):
        return value
    if isinstance(value, Mapping):
        return list(value.values())
    return None


def php_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A query string the way PHP reads it: `filter[0][name][$in][]=a` becomes nested arrays.

    Written by hand because no library here parses PHP's bracket syntax; arrays come out as
    dicts keyed by their (string) indexes, which `as_array` reads as lists.
    """
    args: dict[str, Any] = {}
    for key, value in pairs:
        base, _, rest = key.partition("[")
        if not base:
            continue
        path = _PHP_KEY_RE.findall("[" + rest) if rest else []
        if not path:
            args[base] = value
            continue
        node = args.get(base)
        if not isinstance(node, dict):
            node = args[base] = {}
        for part in path[:-1]:
            part = part or str(len(node))
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1] or str(len(node))] = value
    return args


def _php_int(value: object) -> int:
    """(int) in PHP: the leading digits of a string, 0 when there are none."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    match = re.match(r"\s*[-+]?\d+", str(value or ""))
    return int(match.group()) if match else 0


def _php_type(value: object) -> str:
    return {str: "string", int: "integer", float: "double", bool: "boolean"}.get(
        type(value), "NULL" if value is None else "array"
    )
