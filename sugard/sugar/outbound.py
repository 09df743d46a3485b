"""The way out to an instance's Sugar: the outbound HTTP proxy (or none) and the TLS context
built from `verify_tls` and `ca_file`.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from sugard.config import DIRECT, InstanceConfig
from sugard.secret import Secret

__all__ = ["Route", "UnusableCaFile", "route_for", "route_lines", "tls_context"]


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


@dataclass(frozen=True)
class Route:
    """The way to one instance's site. `proxy` is the proxy's URL without credentials (None:
    direct); `source` says why, for humans; `problem` says why the proxy asked for cannot be
    used (then nothing is sent at all)."""

    proxy: str | None = None
    source: str = ""
    authorization: Secret | None = None  # the Proxy-Authorization header's value
    user: str | None = None  # proxy_username, when the credentials come from the config
    variable: str = ""  # the environment variable the proxy comes from, if it does
    problem: str | None = None

    @property
    def credentials(self) -> str:
        """Whose credentials go to the proxy, for messages (never the credentials)."""
        if self.user is not None:
            return f"proxy_username {self.user!r}"
        return f"the credentials in {self.variable}" if self.authorization else ""

    def describe(self) -> str:
        if self.problem is not None:
            return f"unusable proxy: {self.problem}"
        if self.proxy is None:
            return f"direct ({self.source})"
        who = f", as {self.credentials}" if self.user is not None else ""
        who = who or (", with its credentials" if self.authorization else "")
        return f"via proxy {self.proxy} ({self.source}{who})"

    def request_options(self, url: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """aiohttp request arguments that send a request for `url` this way."""
        if self.proxy is None:
            return {"headers": dict(headers)}
        options: dict[str, Any] = {"headers": dict(headers), "proxy": self.proxy}
        if self.authorization is not None:
            credentials = {"Proxy-Authorization": self.authorization.reveal()}
            if url.startswith("https://"):
                options["proxy_headers"] = credentials  # sent with the CONNECT only
            else:
                # aiohttp sends proxy_headers only with a CONNECT; a plain-HTTP request is
                # itself addressed to the proxy, so it carries the credentials in its own
                # headers (what the deprecated proxy_auth argument did).
                options["headers"].update(credentials)
        return options


def route_for(instance: InstanceConfig) -> Route:
    """The way `instance`'s requests go: the `proxy` key, else the daemon's environment."""
    if instance.proxy == DIRECT:
        return Route(source='proxy = "none" in the config')
    if instance.proxy is not None:
        return _with_config_credentials(
            instance, Route(proxy=instance.proxy, source="proxy in the config")
        )
    site = URL(instance.url)
    variable = _variable(site.scheme)
    try:
        proxy, auth = get_env_proxy_for_url(site)
    except LookupError:
        if site.host is not None and urllib.request.proxy_bypass(site.host):
            return Route(source=f"{site.host} is in NO_PROXY")
        if site.scheme in urllib.request.getproxies():  # one aiohttp skipped: https://
            return _unusable(variable, "")
        return Route(source="no proxy in the config or the environment")
    except ValueError:  # not a URL at all
        return _unusable(variable, "")
    if _in_no_proxy_network(site.host):
        return Route(source=f"{site.host} is in NO_PROXY")
    if proxy.scheme != "http" or not proxy.host:
        return _unusable(variable, str(proxy))
    route = Route(proxy=str(proxy), source=f"from {variable}", variable=variable)
    if instance.proxy_username is None and auth is not None:
        return replace(route, authorization=Secret(auth.encode()))
    return _with_config_credentials(instance, route)


def _unusable(variable: str, value: str) -> Route:
    # The value is shown only if it cannot hold a password (user:password@ in a value that
    # is not a URL stays in it).
    shown = f" ({value})" if value and "@" not in value else ""
    return Route(
        problem=f"{variable}{shown} is not an http:// proxy URL; write {variable} as "
        "http://HOST:PORT in the daemon's environment and restart sugard, or set proxy in "
        "the config"
    )


def _with_config_credentials(instance: InstanceConfig, route: Route) -> Route:
    user, password = instance.proxy_username, instance.proxy_password
    if user is None or password is None:
        return route
    # Unresolved (show-config never reads secrets): described, not sendable.
    authorization = (
        Secret(aiohttp.encode_basic_auth(user, password.reveal()))
        if password.value is not None
        else None
    )
    return replace(route, authorization=authorization, user=user)


def _variable(scheme: str) -> str:
    """The variable a proxy for `scheme` was read from; the lower-case one wins, as in urllib."""
    lower = f"{scheme}_proxy"
    return lower if os.environ.get(lower) else lower.upper()


def _in_no_proxy_network(host: str | None) -> bool:
    """NO_PROXY's address ranges (like 10.0.0.0/8), which curl and requests honour: urllib's
    matching, which aiohttp uses, knows only names and name suffixes."""
    no_proxy = urllib.request.getproxies().get("no", "")
    if host is None or not no_proxy:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False


def route_lines(routes: Mapping[str, Route], *, together: bool = False) -> list[str]:
    """The log's account of the routes: a line per instance, or `together` one line if every
    instance goes the same way."""
    described = {name: route.describe() for name, route in routes.items()}
    if together and len(described) > 1 and len(set(described.values())) == 1:
        return [f"all {len(described)} instances: outbound {next(iter(described.values()))}"]
    return [f"{name}: outbound {text}" for name, text in described.items()]
