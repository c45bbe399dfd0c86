"""auth: `Authorization: Bearer <JWT or API key>` on every /v1 call, and nothing else.

The algorithm is pinned by config (a token naming another is refused, `none`
included); `exp` is required; `aud` and `iss` are checked when configured. The
userId is the configured claim when it fits the contract's id charset and does not
start with `h-`, otherwise `h-` + the first 32 hex digits of its SHA-256 (identity
providers issue ids like `auth0|...` and e-mail addresses). The mapping is injective:
a claim that starts with `h-` is hashed too, so no claim can be taken as verbatim
another claim's hashed id.

A token starting `cak_` is an API key (`bin/chat-actors keys`), never a JWT: its shape
is checked before anything else, then its SHA-256 is looked up in Postgres. What a
lookup found, or did not, is kept `KEY_CACHE_S`, so a revoked key is refused by every
gateway within 5 s and a busy key costs one query per 4 s per gateway.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import jwt
import trio

from actors.errors import PermanentError, TransientError
from messages.wire import is_ident

log = logging.getLogger("chat_actors.gateway.auth")

DEV_TOKEN_S = 12 * 3600


class Unauthorized(Exception):
    """401, with the reason the client is told."""


HASHED = "h-"  # the prefix of a hashed claim; no claim is taken verbatim with it


def user_id_of(claim: str) -> str:
    if is_ident(claim) and not claim.startswith(HASHED):
        return claim
    return HASHED + hashlib.sha256(claim.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def bearer_token(authorization: str | None) -> str:
    """The token of `Authorization: Bearer <token>`, or Unauthorized saying why."""
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be: Bearer <token>")
    return token.strip()


@dataclass(frozen=True)
class Verifier:
    key: str | bytes  # the HS256 secret, or the RS256 public key (PEM)
    algorithm: str
    audience: str | None
    issuer: str | None
    user_claim: str

    def user(self, authorization: str | None) -> str:
        """The userId the request's Bearer token names, or Unauthorized saying why."""
        return self.token_user(bearer_token(authorization))

    def token_user(self, token: str) -> str:
        """The userId the JWT names, or Unauthorized saying why."""
        try:
            claims = jwt.decode(
                token, self.key, algorithms=[self.algorithm], audience=self.audience,
                issuer=self.issuer, options={"require": ["exp"], "verify_aud": bool(self.audience),
                                             "verify_iss": bool(self.issuer)})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired: sign in again") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized(f"the token is not signed with {self.algorithm}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        claim = claims.get(self.user_claim)
        if not isinstance(claim, str) or not claim:
            raise Unauthorized(f"the token has no {self.user_claim!r} claim naming the user")
        return user_id_of(claim)

    def dev_token(self, user: str) -> str:
        """A token for `user`, signed with the HS256 secret (only `dev` offers it)."""
        now = int(time.time())
        claims: dict[str, object] = {self.user_claim: user, "iat": now, "exp": now + DEV_TOKEN_S}
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self.key, algorithm=self.algorithm)


# -- API keys -------------------------------------------------------------------------

API_KEY_PREFIX = "cak_"
# The whole shape of a key: 32 random bytes are 43 base64url characters, unpadded.
_API_KEY = re.compile(r"cak_[A-Za-z0-9_-]{43}")
_API_KEY_LENGTH = 47
MALFORMED_KEY = "malformed API key: cak_ and 43 characters of A-Z, a-z, 0-9, - and _"
UNKNOWN_KEY = "unknown or revoked API key"
KEY_CACHE_S = 4.0  # below 5 s: `keys revoke` takes effect at every gateway within 5 s
KEY_CACHE_SIZE = 10_000  # keys (and unknown hashes) remembered, least recently used out
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and gateway
TOUCH_WAIT_S = 1.0  # a slow write of last_used_at is left behind, never waited out


class KeyLookup(Protocol):
    """What the gateway needs of the keys table (actors/adapters/postgres.py Postgres)."""

    async def key_owner(self, secret_sha256: str) -> tuple[str, str] | None:
        """(key id, user id) of the unrevoked key with this SHA-256 (hex), or None."""
        ...

    async def touch_key(self, key_id: str) -> None: ...


@dataclass(frozen=True)
class Caller:
    """Who is calling: the userId, and the API key it authenticated with (None: a JWT)."""

    user: str
    key_id: str | None = None


@dataclass(frozen=True)
class _Known:
    owner: tuple[str, str] | None  # (key id, user id); None: no such key, or revoked
    until: float  # trio.current_time() when it is looked up again


class _Lookup:
    """One query for a key's owner, shared by the requests that need it meanwhile."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.failed: TransientError | None = None


class Authenticator:
    """Names the caller of a request from its `Authorization` header: a JWT through the
    `Verifier`, an API key through `keys` (cached `KEY_CACHE_S`)."""

    def __init__(self, verifier: Verifier, keys: KeyLookup, *, cache_s: float = KEY_CACHE_S,
                 cache_size: int = KEY_CACHE_SIZE, touch_every_s: float = TOUCH_EVERY_S) -> None:
        self.verifier = verifier
        self._keys = keys
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._touch_every_s = touch_every_s
        self._known: OrderedDict[str, _Known] = OrderedDict()  # by SHA-256, oldest use first
        self._touched: OrderedDict[str, float] = OrderedDict()  # by key id
        self._looking_up: dict[str, _Lookup] = {}

    async def identify(self, authorization: str | None) -> Caller:
        """The caller the header names, or Unauthorized saying why. TransientError when
        the keys table cannot be read now (the gateway answers 503)."""
        token = bearer_token(authorization)
        if not token.startswith(API_KEY_PREFIX):
            return Caller(user=self.verifier.token_user(token))
        # Checked before hashing or a query: a token of any other length or alphabet (a
        # megabyte, non-ASCII, base64's +/=) costs nothing.
        if len(token) != _API_KEY_LENGTH or _API_KEY.fullmatch(token) is None:
            raise Unauthorized(MALFORMED_KEY)
        owner = await self._owner(hashlib.sha256(token.encode("ascii")).hexdigest())
        if owner is None:
            raise Unauthorized(UNKNOWN_KEY)
        key_id, user = owner
        await self._touch(key_id)
        return Caller(user=user, key_id=key_id)

    async def _owner(self, digest: str) -> tuple[str, str] | None:
        """The key's owner, from the cache while fresh, else from one query that the
        requests asking meanwhile share (a burst on a key is one query, not hundreds)."""
        while True:
            known = self._known.get(digest)
            if known is not None and trio.current_time() < known.until:
                self._known.move_to_end(digest)
                return known.owner
            pending = self._looking_up.get(digest)
            if pending is None:
                break
            await pending.done.wait()
            if pending.failed is not None:  # each request fails as the shared query did
                raise TransientError(str(pending.failed), retry_after=pending.failed.retry_after,
                                     kind=pending.failed.kind)
            # Otherwise its answer is cached now (or its request was cancelled: ask again).
        lookup = self._looking_up[digest] = _Lookup()
        try:
            owner = await self._keys.key_owner(digest)
        except TransientError as exc:
            lookup.failed = exc
            raise
        finally:
            del self._looking_up[digest]
            lookup.done.set()
        self._known[digest] = _Known(owner, trio.current_time() + self._cache_s)
        self._known.move_to_end(digest)
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)
        return owner

    async def _touch(self, key_id: str) -> None:
        """Write the key's last_used_at when it is due (a minute after the last write
        from this gateway). The request never fails nor waits long for it: it is a
        record for operators, not a check."""
        now = trio.current_time()
        last = self._touched.get(key_id)
        if last is not None and now < last + self._touch_every_s:
            return
        self._touched[key_id] = now  # before the write: requests meanwhile do not repeat it
        self._touched.move_to_end(key_id)
        while len(self._touched) > self._cache_size:
            self._touched.popitem(last=False)
        with trio.move_on_after(TOUCH_WAIT_S) as waited:
            try:
                await self._keys.touch_key(key_id)
            except (TransientError, PermanentError) as exc:
                log.warning("API key %s: its last use was not recorded: %s", key_id, exc)
        if waited.cancelled_caught:
            log.warning("API key %s: recording its last use took over %g s; left behind",
                        key_id, TOUCH_WAIT_S)
