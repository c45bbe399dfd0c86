"""auth: `Authorization: Bearer <JWT>` on every /v1 call, and nothing else.

The algorithm is pinned by config (a token naming another is refused, `none`
included); `exp` is required; `aud` and `iss` are checked when configured. The
userId is the configured claim when it fits the contract's id charset and does not
start with `h-`, otherwise `h-` + the first 32 hex digits of its SHA-256 (identity
providers issue ids like `auth0|...` and e-mail addresses). The mapping is injective:
a claim that starts with `h-` is hashed too, so no claim can be taken as verbatim
another claim's hashed id.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import jwt

from messages.wire import is_ident

DEV_TOKEN_S = 12 * 3600


class Unauthorized(Exception):
    """401, with the reason the client is told."""


HASHED = "h-"  # the prefix of a hashed claim; no claim is taken verbatim with it


def user_id_of(claim: str) -> str:
    if is_ident(claim) and not claim.startswith(HASHED):
        return claim
    return HASHED + hashlib.sha256(claim.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Verifier:
    key: str | bytes  # the HS256 secret, or the RS256 public key (PEM)
    algorithm: str
    audience: str | None
    issuer: str | None
    user_claim: str

    def user(self, authorization: str | None) -> str:
        """The userId the request's Bearer token names, or Unauthorized saying why."""
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be: Bearer <token>")
        try:
            claims = jwt.decode(
                token.strip(), self.key, algorithms=[self.algorithm], audience=self.audience,
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
