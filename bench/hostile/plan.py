"""What a client process is asked to do (one JSON object from the harness), and what
every user needs: the gateway's port, a token per user, the phase's end."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import trio


@dataclass(frozen=True)
class Plan:
    port: int
    secret: str
    seconds: float  # no user starts anything new after this
    seed: int = 7
    # honest users
    users: int = 50
    think_s: tuple[float, float] = (1.0, 3.0)
    turns_per_session: int = 3
    turn_timeout_s: float = 45.0  # from the POST to the `done`
    post_timeout_s: float = 75.0  # one POST (a frozen broker holds it up to its timeout)
    uploaders: int = 4  # honest users who also upload a small note now and then
    upload_every_s: float = 12.0
    upload_timeout_s: float = 30.0
    # hostile users (phase B)
    lei_users: int = 2
    oversize_count: int = 3
    oversize_cap_s: float = 30.0
    slow_connections: int = 20
    schema_levels: tuple[int, ...] = (19, 21, 23, 25)
    schema_model: str = "gemini"
    schema_wait_s: float = 60.0
    pdf_count: int = 2
    pdf_wait_s: float = 60.0
    burst_users: int = 2
    bursts: int = 4
    burst_size: int = 400
    burst_hold_s: float = 15.0
    retry_count: int = 10
    pause_at: float = 10.0  # when the harness freezes the broker, from the phase's start
    pause_s: float = 0.0

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Plan:
        pairs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return cls(**pairs)


@dataclass
class Context:
    plan: Plan
    began: float = field(default_factory=trio.current_time)

    @property
    def end(self) -> float:
        return self.began + self.plan.seconds

    def token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, self.plan.secret,
                          algorithm="HS256")

    def headers(self, user: str, **more: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(user)}", **more}


def marker() -> str:
    """Names one logical request: it ends the message, so the vendor's calls and the
    history rows say which request they answer, across retries and jobs."""
    return f"lr-{uuid.uuid4().hex[:16]}"
