"""What the gateway carries for its lifetime: made in the lifespan, found in ``app.state.sg``."""

from __future__ import annotations

from dataclasses import dataclass

from shared.roles import Roles
from shared.settings import Settings

from .access import Access
from .metrics import GatewayMetrics
from .shards import Shards


@dataclass
class State:
    settings: Settings
    shards: Shards  # each with its clients, event log, relay and sessions
    roles: Roles
    access: Access
    metrics: GatewayMetrics
