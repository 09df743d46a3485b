"""Fleet mode: the sugard of many hosts share one Sugar session per instance through Redis.

The pieces, each usable and tested on its own; the keeper wires them (see docs/fleet.md).
`errors` holds the error tree, `sealing` the key, identity and record, `store` the Redis
commands, `lease` the leader's deadline, `member` one instance's seat, `hub` the fleet of
them, `online` the check:

- `FleetKey`, `identity_of`: the shared key and the name an instance's session has in Redis
  (a keyed hash of url, username, platform and client_id: no username in plain text).
- `seal` / `unseal`: a `SessionRecord` to AES-GCM bytes and back, bound to its identity and epoch.
- `FleetStore`: every Redis command sugard sends, each bounded by a timeout; the session is
  written only by compare-and-set on the epoch, fenced by the lease.
- `Lease`: the leader's local deadline, counted from when it *sent* the acquire or renew.
- `FleetMember`: one instance's seat: role, the record held in memory, forwarding to the leader.
- `Fleet`: one per daemon: the Redis client, this host's holder id, one pub/sub listener.

Errors (nothing here ever carries a token, a password or the key):

    FleetError
    +-- StoreUnreachable    Redis did not answer in time, or the connection failed
    |   +-- StoreRefused    Redis answered but refused us (password, ACL rights)
    +-- WrongKey            a stored record does not open with this host's key
"""

from sugard.fleet.errors import FleetError, StoreRefused, StoreUnreachable, WrongKey
from sugard.fleet.hub import Fleet
from sugard.fleet.lease import Lease
from sugard.fleet.member import FleetMember
from sugard.fleet.online import check_fleet_online
from sugard.fleet.sealing import FleetKey, SessionRecord, identity_of, seal, unseal
from sugard.fleet.store import FleetStore, NotLeader, RenewalRequest, Stale, Written

__all__ = [
    "Fleet",
    "FleetError",
    "FleetKey",
    "FleetMember",
    "FleetStore",
    "Lease",
    "NotLeader",
    "RenewalRequest",
    "SessionRecord",
    "Stale",
    "StoreRefused",
    "StoreUnreachable",
    "Written",
    "WrongKey",
    "check_fleet_online",
    "identity_of",
    "seal",
    "unseal",
]
