"""The OpenAPI document is built in two parts (sugard.api.schemas: the components;
sugard.api.openapi: the paths on them): every reference between them resolves, and no schema is
left unreferenced, so the split cannot drift into dead or missing schemas."""

from __future__ import annotations

import json
from typing import Any

from sugard.api.openapi import spec
from sugard.api.schemas import SCHEMAS


def references(node: Any) -> set[str]:
    """The schema names `node` refers to with `$ref`, at any depth."""
    if isinstance(node, dict):
        found = {node["$ref"].rpartition("/")[2]} if "$ref" in node else set()
        return found.union(*(references(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(references(item) for item in node))
    return set()


def test_every_reference_resolves_and_every_schema_is_referenced() -> None:
    document = spec()
    assert SCHEMAS == document["components"]["schemas"]
    from_paths = references(document["paths"])
    from_schemas = references(SCHEMAS)
    assert set() == (from_paths | from_schemas) - set(SCHEMAS)  # none missing
    assert set() == set(SCHEMAS) - from_paths - from_schemas  # none dead


def test_the_document_is_plain_json_and_each_call_a_fresh_copy() -> None:
    """What the daemon serves is json.dumps of spec(); a caller changing its copy changes no
    later answer."""
    first = spec()
    text = json.dumps(first, sort_keys=True)
    first["components"]["schemas"]["Error"]["required"].append("changed")
    assert text == json.dumps(spec(), sort_keys=True)
