"""Identity: bearer tokens from ``API_KEYS``, JWTs (``turnrelay.api.jwt_auth``),
or one local user when neither is configured.

A bearer token that is one of the API keys (compared in constant time) is
that key's user; otherwise, when JWTs are configured, a token of JWT form is
verified and its user claim is the user. Both may be on at once: keys for
scripts and services, JWTs for the product's signed-in users.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from turnrelay.api.jwt_auth import JwtVerifier, looks_like_jwt
from turnrelay.errors import Unauthorized

LOCAL_USER = "local"
MAX_TOKEN_CHARS = 8192


class Authenticator:
    def __init__(self, tokens: dict[str, str], jwt: JwtVerifier | None = None) -> None:
        self._tokens = tokens
        self._jwt = jwt

    @property
    def open(self) -> bool:
        return not self._tokens and self._jwt is None

    async def user_for(self, request: Request) -> str:
        if self.open:
            return LOCAL_USER
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized(f"token over {MAX_TOKEN_CHARS} characters", code="invalid_token")
        for known, user in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
        if self._jwt is not None and looks_like_jwt(token):
            return await self._jwt.user_for(token)
        raise Unauthorized("unknown token")
