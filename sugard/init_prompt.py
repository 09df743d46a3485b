"""`sugard init`'s questions on the terminal: each answer checked at once and asked again if
wrong, secrets typed twice and never shown."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable

__all__ = ["Cancelled", "Prompter"]


class Cancelled(Exception):
    """The user ended the questions (end of input): nothing is to be written."""


class Prompter:
    """Asks on the terminal; every answer is checked at once and asked again if wrong."""

    def __init__(self) -> None:
        self.out = sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ask(self, label: str, check: Callable[[str], str], default: str | None = None) -> str:
        shown = f"{label} [{default}]: " if default else f"{label}: "
        while True:
            self.out.write(shown)
            self.out.flush()
            line = sys.stdin.readline()
            if not line:
                raise Cancelled
            value = line.strip() or (default or "")
            try:
                return check(value)
            except ValueError as exc:
                self.say(f"  {exc}")

    def secret(self, label: str, *, allow_empty: bool = False) -> str:
        """Asked twice, unseen: a typo here would only show as a rejected login later."""
        while True:
            value = self._unseen(f"{label} (not shown): ")
            if not value and not allow_empty:
                self.say("  must not be empty")
            elif not value or self._unseen("Again, to be sure (not shown): ") == value:
                return value
            else:
                self.say("  the two differ; once more")

    def _unseen(self, prompt: str) -> str:
        try:
            return getpass.getpass(prompt, stream=self.out)
        except EOFError:
            raise Cancelled from None

    def confirm(self, question: str) -> bool:
        answer = self.ask(f"{question} [Y/n]", _yes_no, "y")
        return answer == "y"


def _yes_no(value: str) -> str:
    answer = value.strip().lower()[:1]
    if answer not in ("y", "n"):
        raise ValueError("answer y or n")
    return answer
