"""Connecting to Redis as `redis.url` says: one server, a Redis Cluster, or the primary
that Redis Sentinel names (redis+sentinel://).

With Sentinel, redis-py asks the sentinels where the primary is whenever it opens a
connection, and drops a connection whose server turned replica (its READONLY reply), so
after a failover the next try reaches the new primary. Our own RESP connections (the
gateway's blocking reader) ask through `primary` before each connect.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from config import Redis as RedisConfig
from config import secret


class RedisConnect:
    """The redis-py client for one `redis` config section (`client`), and where to open
    a connection of our own to the primary (`primary`)."""

    def __init__(self, config: RedisConfig, **options: Any) -> None:
        """`options` go to every data connection (socket timeouts, decode_responses)."""
        self.url = config.url
        self._password = secret(config.password_env)
        self.sentinel = config.sentinel()
        self._sentinels: Sentinel | None = None
        options["password"] = self._password
        if not config.cluster:
            # One immediate retry (a pooled connection the server closed), not redis-py's
            # three with backoff up to 10 s: our callers retry with their own backoff,
            # and a call stuck in a thread cannot be cancelled.
            options["retry"] = Retry(NoBackoff(), 1)
        if self.sentinel is not None:
            asking = {k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"}
            self._sentinels = Sentinel(
                list(self.sentinel.sentinels),
                sentinel_kwargs={**asking, "password": secret(config.sentinel_password_env)},
                **options)
            self.client: Any = self._sentinels.master_for(
                self.sentinel.service, db=self.sentinel.db, username=self.sentinel.username)
        elif config.cluster:
            self.client = redis.RedisCluster.from_url(config.url, **options)
        else:
            self.client = redis.Redis.from_url(config.url, **options)

    def primary(self) -> dict[str, Any]:
        """Where to connect to the primary now, as redis-py's parse_url gives it, with the
        password (blocking: with Sentinel, the sentinels are asked)."""
        if self._sentinels is None or self.sentinel is None:
            target: dict[str, Any] = parse_url(self.url)
        else:
            host, port = self._sentinels.discover_master(self.sentinel.service)
            target = {"host": host, "port": int(port), "db": self.sentinel.db}
            if self.sentinel.username:
                target["username"] = self.sentinel.username
        if self._password:
            target["password"] = self._password
        return target

    def close(self) -> None:
        self.client.close()
        if self._sentinels is not None:
            self._sentinels.close()
