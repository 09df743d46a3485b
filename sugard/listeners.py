"""The proxy's TCP listeners, one per instance with `listen`: bound before a reload swaps
its config in (so an address in use fails the reload, and the old ones keep serving), and
closed after it, when removed or moved."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from .config import Config
from .errors import ReloadFailed
from .peer import peer_of_tcp_socket
from .proxy import Forwarder, ProxyListener

__all__ = ["close_listeners", "open_listeners"]


async def open_listeners(
    forwarder: Forwarder,
    config: Config,
    current: Mapping[str, ProxyListener],
    *,
    shutdown_timeout: float,
) -> dict[str, ProxyListener]:
    """The proxy listeners `config` asks for: the current ones where their address stays,
    new ones bound now. If one cannot be bound, those bound here are closed again and
    ReloadFailed says why; the current ones are never touched here."""
    wanted: dict[str, ProxyListener] = {}
    opened: list[ProxyListener] = []
    try:
        for name, instance in config.instances.items():
            if instance.listen is None:
                continue
            kept = current.get(name)
            if kept is not None and kept.address == instance.listen:
                wanted[name] = kept
                continue
            listener = ProxyListener(
                forwarder,
                name,
                instance.listen,
                peer_of_tcp_socket,
                shutdown_timeout=shutdown_timeout,
            )
            try:
                await listener.start()
            except OSError as exc:
                raise ReloadFailed(
                    [
                        f"instances.{name}.listen: cannot listen on {instance.listen}: "
                        f"{exc.strerror or exc}; choose another port"
                    ]
                ) from None
            opened.append(listener)
            wanted[name] = listener
    except BaseException:
        await asyncio.gather(*(listener.stop() for listener in opened))
        raise
    return wanted


async def close_listeners(
    forwarder: Forwarder,
    current: Mapping[str, ProxyListener],
    keep: Mapping[str, ProxyListener],
) -> None:
    """Stop the listeners of `current` that are not in `keep` (removed, or moved to a new
    address)."""
    kept = set(map(id, keep.values()))
    gone = [lis for lis in current.values() if id(lis) not in kept]
    await asyncio.gather(*(listener.stop() for listener in gone))
    for listener in keep.values():
        # A moved listener's successor bound first; the old one's stop() dropped the URL.
        forwarder.listener_urls[listener.name] = listener.url
