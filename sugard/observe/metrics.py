"""The Prometheus exposition: `GET /v1/metrics` on the socket, `/metrics` on `metrics_listen`.

Two kinds of numbers, read two ways:

- what an instance *is* (state, seconds to expiry, fleet role) is read at scrape time from the
  keepers' `status()`, so it can never drift from what `sugarctl status` shows;
- what *happened* (upstream calls, token requests, renewals, evictions, proxied requests) is
  counted as it happens, through the `Observer` methods the keeper, api and proxy call.

Each daemon has its own `CollectorRegistry` (never prometheus_client's global one), so tests
and several daemons in one process do not collide. The only free label value is an instance's
local name: no username, URL or token is ever a label or a value, which is why the metrics may
be served beyond loopback. That name is the label `sugar_instance` (see LABEL).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from sugard import __version__
from sugard.observe import (
    EVICTION_FOUND_BY,
    RENEWAL_REASONS,
    SUDO_OUTCOMES,
    TOKEN_OUTCOMES,
    UPSTREAM_GRANTS,
    UPSTREAM_OUTCOMES,
    Event,
    Evicted,
    Forgotten,
    Governed,
    Observer,
    Proxied,
    RenewalStarted,
    SudoCall,
    TokenRequested,
    UpstreamCall,
)
from sugard.wire import STATES

__all__ = ["PROXY_BUCKETS", "Metrics", "status_class"]

Statuses = Callable[[], Iterable[Mapping[str, Any]]]

# Proxied Sugar calls: a cached record read takes milliseconds, a report or a 2 GB download
# minutes (the proxy's own timeout is 300 s).
PROXY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A request queued for the rate: none (0), a turn (tens of ms), up to rate_wait (30 s).
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FLEET_ROLES = ("leader", "follower")
# The instance's local name. Not `instance`: Prometheus sets that label on every scraped
# series itself (the target's host:port) and would rename ours to `exported_instance`.
LABEL = "sugar_instance"


def status_class(status: int | None) -> str:
    """`2xx` ... `5xx` for an HTTP status; `none` when no answer was sent at all."""
    if status is None or not 100 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


class Metrics(Observer):
    """The daemon's metrics: an Observer for the counters, the keepers' status for the
    gauges, and `render()` for a scrape of them all."""

    def __init__(
        self,
        statuses: Statuses,
        *,
        clock: Callable[[], float] = time.time,
        process: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._statuses = statuses
        self._known: set[str] = set()
        self._upstream = Counter(
            "sugard_upstream_calls",
            "Calls to Sugar by grant (password, refresh, probe, serverinfo, logout) and outcome.",
            [LABEL, "grant", "outcome"],
            registry=registry,
        )
        self._token_requests = Counter(
            "sugard_token_requests",
            "Token requests (token, invalidate, refresh, revoke) answered, by outcome.",
            [LABEL, "outcome"],
            registry=registry,
        )
        self._renewals = Counter(
            "sugard_renewals",
            "Renewals of the session started, by reason.",
            [LABEL, "reason"],
            registry=registry,
        )
        self._evictions = Counter(
            "sugard_evictions",
            "Times Sugar no longer accepted the session, by how it was found.",
            [LABEL, "found_by"],
            registry=registry,
        )
        self._proxied = Counter(
            "sugard_proxy_requests",
            "Requests proxied to Sugar, by the class of the status answered.",
            [LABEL, "status_class"],
            registry=registry,
        )
        self._sudo = Counter(
            "sugard_sudo_calls",
            "Tokens of other users (Sugar's sudo) asked of Sugar, by outcome; not_listed and "
            "held_back were refused by sugard with no call (never a user's name).",
            [LABEL, "outcome"],
            registry=registry,
        )
        self._proxy_seconds = Histogram(
            "sugard_proxy_request_duration_seconds",
            "Time from a proxied request's arrival to the end of its answer.",
            [LABEL],
            buckets=PROXY_BUCKETS,
            registry=registry,
        )
        self._queued = Histogram(
            "sugard_proxy_queued_seconds",
            "Time proxied requests waited in the instance's rate_limit queue (refused ones "
            "not counted).",
            [LABEL],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self._rate_refused = Counter(
            "sugard_proxy_rate_refused",
            "Proxied requests answered 429: they could not go within rate_wait.",
            [LABEL],
            registry=registry,
        )
        self._clock = clock
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    # Observer

    def observe(self, event: Event) -> None:
        match event:
            case UpstreamCall(instance, grant, outcome):
                self._upstream.labels(instance, grant, outcome).inc()
            case TokenRequested(instance, outcome):
                self._token_requests.labels(instance, outcome).inc()
            case RenewalStarted(instance, reason):
                self._renewals.labels(instance, reason).inc()
            case Evicted(instance, found_by):
                self._evictions.labels(instance, found_by).inc()
            case Proxied(instance, status, seconds):
                self._proxied.labels(instance, status_class(status)).inc()
                self._proxy_seconds.labels(instance).observe(seconds)
            case SudoCall(instance, sudo_outcome):
                self._sudo.labels(instance, sudo_outcome).inc()
            case Governed(instance, None):
                self._rate_refused.labels(instance).inc()
            case Governed(instance, float(queued)):
                self._queued.labels(instance).observe(queued)
            case Forgotten(instances):
                self.forget(instances)

    def forget(self, instances: Iterable[str]) -> None:
        for name in instances:
            for counter in self._labelled():
                counter.remove_by_labels({LABEL: name})
            self._known.discard(name)

    # Exposition

    async def render(
        self,
        accept: str = "",
        names: Sequence[str] = (),
        shown: Callable[[str], bool] | None = None,
    ) -> tuple[bytes, str]:
        """(body, Content-Type) of a scrape: the format the `Accept` header asks for, only the
        metrics in `names` if any are given, only the series of the instances `shown` admits
        (None: all of them).

        The keepers are read here, on the event loop (they are not thread-safe); the text is
        written in a thread, since for 1,000 instances that takes long enough to be felt by
        every token request waiting on the loop.
        """
        snapshot = [dict(status) for status in self._statuses()]
        self.sync(snapshot)
        encoder, content_type = choose_encoder(accept)
        families = _instance_families(snapshot, self._clock())
        scrape = _Scrape(self.registry, families, set(names), shown)
        return await asyncio.to_thread(encoder, scrape), content_type

    def sync(self, statuses: Iterable[Mapping[str, Any]] | None = None) -> None:
        """Give every configured instance all its counters, at 0 until something happens (so
        `rate()` and `increase()` see the first event), and drop those of instances gone."""
        statuses = list(statuses or self._statuses())
        names = {str(status["name"]) for status in statuses}
        self.forget(self._known - names)
        for status in statuses:
            # Only where the instance acts as other users: the others would carry zeros.
            if status.get("sudo") is not None:
                for sudo_outcome in SUDO_OUTCOMES:
                    self._sudo.labels(str(status["name"]), sudo_outcome)
        for name in names - self._known:
            for grant, outcome in itertools.product(UPSTREAM_GRANTS, UPSTREAM_OUTCOMES):
                self._upstream.labels(name, grant, outcome)
            for token_outcome in TOKEN_OUTCOMES:
                self._token_requests.labels(name, token_outcome)
            for reason in RENEWAL_REASONS:
                self._renewals.labels(name, reason)
            for found_by in EVICTION_FOUND_BY:
                self._evictions.labels(name, found_by)
            # The proxy's series wait for its first request: an instance nobody proxies to
            # would carry a histogram of 16 series for nothing.
        self._known |= names

    def _labelled(self) -> tuple[Counter | Histogram, ...]:
        return (
            self._upstream,
            self._token_requests,
            self._renewals,
            self._evictions,
            self._proxied,
            self._proxy_seconds,
            self._sudo,
            self._queued,
            self._rate_refused,
        )


class _Scrape(Collector):
    """One scrape: the registry's metrics and the instance families read for it, only the
    samples named in `names` when any are given, and only the series of the instances `shown`
    admits (the others' are left out as if they did not exist)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        families: list[Metric],
        names: set[str],
        shown: Callable[[str], bool] | None = None,
    ):
        self._registry = registry
        self._families = families
        self._names = names
        self._shown = shown

    def collect(self) -> Iterator[Metric]:
        for family in itertools.chain(self._registry.collect(), self._families):
            if not self._names and self._shown is None:
                yield family
                continue
            # As prometheus_client's restricted registry does: by sample name.
            kept = [sample for sample in family.samples if self._keeps(sample)]
            if kept:
                narrowed = Metric(family.name, family.documentation, family.type, family.unit)
                narrowed.samples = kept
                yield narrowed

    def _keeps(self, sample: Sample) -> bool:
        if self._names and sample.name not in self._names:
            return False
        instance = sample.labels.get(LABEL)
        return self._shown is None or instance is None or self._shown(instance)


def _instance_families(statuses: Iterable[Mapping[str, Any]], now: float) -> list[Metric]:
    """State, expiry and fleet role of every instance, from its status."""
    state = GaugeMetricFamily(
        "sugard_instance_state",
        "1 for the instance's current state, 0 for the others.",
        labels=[LABEL, "state"],
    )
    expires_in = GaugeMetricFamily(
        "sugard_token_expires_in_seconds",
        "Seconds until the current access token expires (negative: expired); absent while "
        "there is none.",
        labels=[LABEL],
    )
    expires_at = GaugeMetricFamily(
        "sugard_token_expiry_timestamp_seconds",
        "When the current access token expires, in Unix time.",
        labels=[LABEL],
    )
    renewed = GaugeMetricFamily(
        "sugard_last_renewal_timestamp_seconds",
        "When the last new token (login or refresh) arrived, in Unix time.",
        labels=[LABEL],
    )
    role = GaugeMetricFamily(
        "sugard_fleet_role",
        "1 for the instance's role in fleet mode (leader or follower); absent for instances "
        "kept locally.",
        labels=[LABEL, "role"],
    )
    sudo_held = GaugeMetricFamily(
        "sugard_sudo_tokens",
        "Users the instance holds a token of now (Sugar's sudo); absent for instances that act "
        "as no other user.",
        labels=[LABEL],
    )
    sudo_refused = GaugeMetricFamily(
        "sugard_sudo_refused_users",
        "Users Sugar refused the sudo of, not asked again before a person acts (all of them "
        "count as one while Sugar refuses sugard's user itself).",
        labels=[LABEL],
    )
    sudo_expiry = GaugeMetricFamily(
        "sugard_sudo_next_expiry_timestamp_seconds",
        "When the first of the users' tokens expires, in Unix time; absent without one.",
        labels=[LABEL],
    )
    build = GaugeMetricFamily("sugard_build_info", "The running sugard.", labels=["version"])
    for status in statuses:
        name = str(status["name"])
        for candidate in STATES:
            state.add_metric([name, candidate], 1.0 if status["state"] == candidate else 0.0)
        if status.get("expires_at") is not None:
            expires_in.add_metric([name], status["expires_at"] - now)
            expires_at.add_metric([name], status["expires_at"])
        if status.get("last_refresh") is not None:
            renewed.add_metric([name], status["last_refresh"])
        sudo = status.get("sudo")
        if isinstance(sudo, Mapping):
            sudo_held.add_metric([name], float(sudo["held"]))
            refused = 1 if sudo["refused_all"] else sudo["refused"]
            sudo_refused.add_metric([name], float(refused))
            if sudo.get("next_expiry") is not None:
                sudo_expiry.add_metric([name], sudo["next_expiry"])
        fleet = status.get("fleet")
        if isinstance(fleet, Mapping):
            for candidate in FLEET_ROLES:
                role.add_metric([name, candidate], 1.0 if fleet.get("role") == candidate else 0.0)
    build.add_metric([__version__], 1.0)
    sudo = [sudo_held, sudo_refused, sudo_expiry]
    return [state, expires_in, expires_at, renewed, role, *sudo, build]
