"""The TLS context for a site, built in one place: the daemon connects with it, and `sugard
check` judges a `ca_file` by building it the same way."""

from __future__ import annotations

import ssl

__all__ = ["UnusableCaFile", "tls_context"]


class UnusableCaFile(ValueError):
    """`ca_file` cannot be used; the message says why in a few words, and `__cause__` is the
    error that said so (FileNotFoundError, ssl.SSLError or another OSError)."""


def tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext | bool:
    """What aiohttp's `ssl=` takes: False (no verification), True (the system's CAs), or a
    context that trusts the CA of `ca_file`; UnusableCaFile if that file cannot be loaded."""
    if not verify:
        return False
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError as exc:
        raise UnusableCaFile("does not exist") from exc
    except ssl.SSLError as exc:
        raise UnusableCaFile("holds no usable PEM certificate") from exc
    except OSError as exc:
        raise UnusableCaFile(f"cannot be read ({exc.strerror})") from exc
