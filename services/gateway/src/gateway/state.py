"""What the gateway carries for its lifetime: made in the lifespan, found in ``app.state.sg``."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from shared.event_log import EventLog
from shared.roles import Roles
from shared.sessions import SessionStore
from shared.settings import Settings

from .access import Access
from .metrics import GatewayMetrics
from .relay import Relay


@dataclass
class State:
    settings: Settings
    arq: ArqRedis  # also the pool for every non-blocking command
    log: EventLog
    relay: Relay
    sessions: SessionStore
    roles: Roles
    access: Access
    metrics: GatewayMetrics
