"""JWT bearer tokens: the sign-in a product already has, instead of API keys.

Two ways to trust a token, either or both:

- **HS256** with a shared secret (``TURNRELAY_JWT_SECRET``; Supabase's project
  JWT secret, say);
- **RS256/ES256** with the keys of a JWKS URL (``TURNRELAY_JWT_JWKS_URL``;
  Auth0's ``https://<tenant>/.well-known/jwks.json``). Keys are cached by
  ``kid``; a token naming a ``kid`` the cache does not hold refetches the set
  (key rotation), at most once per ``JWT_JWKS_REFETCH`` interval whatever
  tokens arrive, so made-up ``kid`` values cannot turn the API into a
  load generator against the identity provider.

Checked: the signature, with the algorithm the header names only if it is
one of those configured (never ``none``; an HS256 token is refused when only
JWKS keys are configured, so a public key can never be used as an HMAC
secret); ``exp`` (required) and ``nbf`` with ``JWT_LEEWAY`` of clock skew;
``iss`` and ``aud`` when configured. The user id is the ``JWT_USER_CLAIM``
claim (``sub`` by default). Every failure is ``Unauthorized`` with a stable
``code`` (``token_expired``, ``bad_audience``, …), never a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

from turnrelay.errors import BackendUnavailable, Unauthorized

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = ("RS256", "ES256")
MAX_USER_ID_CHARS = 255
JWKS_TIMEOUT_S = 5.0


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class JwtVerifier:
    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        user_claim: str = "sub",
        leeway: float = 30.0,
        jwks_refetch: float = 30.0,
    ) -> None:
        if not secret and not jwks_url:
            raise ValueError("a JwtVerifier needs a secret or a JWKS URL")
        self._secret = secret
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._user_claim = user_claim
        self._leeway = leeway
        self._refetch = jwks_refetch
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.algorithms = (HMAC_ALGORITHMS if secret else ()) + (
            JWKS_ALGORITHMS if jwks_url else ()
        )

    async def user_for(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token", code="invalid_token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized(
                f"token algorithm {str(alg)[:20]!r} is not accepted "
                f"(accepted: {', '.join(self.algorithms)})",
                code="bad_algorithm",
            )
        key: Any = self._secret
        if alg not in HMAC_ALGORITHMS:
            key = await self._jwks_key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not valid yet (nbf)", code="token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience is not this API", code="bad_audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer is not trusted", code="bad_issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature does not verify", code="bad_signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(
                f"token lacks the {exc.claim!r} claim", code="missing_claim"
            ) from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from None
        user = claims.get(self._user_claim)
        if (
            not isinstance(user, str)
            or not user.strip()
            or len(user) > MAX_USER_ID_CHARS
            or "\x00" in user  # a user id is stored; PostgreSQL's text holds no NUL
        ):
            raise Unauthorized(
                f"token's {self._user_claim!r} claim is not a user id", code="missing_claim"
            )
        return user

    async def _jwks_key(self, kid: Any) -> Any:
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise Unauthorized("token header has no key id (kid)", code="unknown_key")
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys and self._may_refetch():
                await self._fetch()
        if kid not in self._keys:
            raise Unauthorized(f"no key {kid[:64]!r} in the JWKS", code="unknown_key")
        return self._keys[kid]

    def _may_refetch(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self._refetch

    async def _fetch(self) -> None:
        assert self._jwks_url is not None
        self._fetched_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=JWKS_TIMEOUT_S) as http:
                response = await http.get(self._jwks_url)
                response.raise_for_status()
                keyset = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            log.warning("fetching the JWKS at %s: %s", self._jwks_url, exc)
            if not self._keys:
                raise BackendUnavailable(f"cannot fetch the JWKS: {exc}") from None
            return
        self._keys = {k.key_id: k.key for k in keyset.keys if k.key_id}
        log.info("JWKS fetched: %d keys", len(self._keys))
