"""What the keeper tells the observer (metrics, on_event) of its calls to Sugar and renewals.

`CountedCalls` stands between the keeper and its `SugarClient`: each password login, refresh,
probe and version read is counted by how Sugar answered (ok, rejected, transient), in one place
rather than at every call site. `renewal_reason` names a demand as the renewals metric counts it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from .keeper_model import Demand
from .observe import Observer, RenewalReason, UpstreamGrant, UpstreamOutcome
from .secret import Secret
from .sugar import Grant, Probe, RejectedError, SugarClient, SugarError

__all__ = ["REASON_LABELS", "CountedCalls", "renewal_reason"]

# A demand's reason, as the renewals metric counts it; "a token request" with a token in hand
# is a min_ttl the token could not meet ("demanded"), with none it is the first ("initial").
REASON_LABELS: dict[str, RenewalReason] = {
    "the schedule": "scheduled",
    "a script's report": "reported",
    "the probe interval": "probe",
    "sugarctl refresh": "forced",
    "a reload": "forced",
}
PROBE_OUTCOMES: dict[Probe, UpstreamOutcome] = {
    Probe.ALIVE: "ok",
    Probe.DEAD: "rejected",
    Probe.UNKNOWN: "transient",
}


def renewal_reason(demand: Demand, grant: Grant | None) -> RenewalReason:
    if grant is None or demand.reason == "no usable token":
        return "initial"
    return REASON_LABELS.get(demand.reason, "demanded")


@dataclass(frozen=True)
class CountedCalls:
    """One instance's calls to Sugar, each told to the observer as it ends."""

    upstream: SugarClient
    observer: Observer
    name: str

    async def login(self) -> Grant:
        return await self._grant("password", self.upstream.login())

    async def refresh(self, refresh_token: Secret) -> Grant:
        return await self._grant("refresh", self.upstream.refresh(refresh_token))

    async def probe(self, access_token: Secret) -> Probe:
        verdict = await self.upstream.probe(access_token)
        self.observer.upstream_call(self.name, "probe", PROBE_OUTCOMES[verdict])
        return verdict

    async def server_version(self, access_token: Secret) -> str | None:
        info = await self.upstream.server_info(access_token)
        # Counted as a ping is: a 401 is Sugar refusing the token, whatever the body.
        self.observer.upstream_call(self.name, "serverinfo", PROBE_OUTCOMES[info.verdict])
        return info.version

    async def _grant(self, grant: UpstreamGrant, call: Awaitable[Grant]) -> Grant:
        """A password or refresh grant, counted by how Sugar answered it."""
        outcome: UpstreamOutcome = "ok"
        try:
            return await call
        except RejectedError:
            outcome = "rejected"
            raise
        except SugarError:
            outcome = "transient"
            raise
        finally:
            self.observer.upstream_call(self.name, grant, outcome)
