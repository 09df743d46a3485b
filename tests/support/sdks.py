"""The third-party Sugar clients' workloads, shared by the fake's tests and the proxy's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.daemon import USER


def pysugarcrm_workload(crm: Any) -> None:
    """What a pysugarcrm script does between login and logout: create, filter, read, count
    (the fake is seeded with one Account of rank 1), and its `me`."""
    created = crm.post("/Accounts", data=json.dumps({"name": "Acme", "rank": 2}))
    assert ("Acme", "Accounts") == (created["name"], created["_module"])
    hits = crm.post("/Accounts/filter", data=json.dumps({"filter": [{"name": "acme"}]}))
    assert [created["id"]] == [r["id"] for r in hits["records"]]
    assert created == crm.get(f"/Accounts/{created['id']}")
    count = crm.get("/Accounts/count", query_params={"filter[0][rank][$gte]": "1"})
    assert {"record_count": 2} == count
    assert USER == crm.me["current_user"]["user_name"]


def run_python(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter in `cwd` (sugarcrm-25-api reads `.env` from the working
    directory) and return what it printed; it must exit 0."""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert 0 == run.returncode, run.stderr
    return run.stdout
