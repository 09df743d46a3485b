"""The README, read as a user reads it."""

from __future__ import annotations

import re

from support import ROOT

README = (ROOT / "README.md").read_text()


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
