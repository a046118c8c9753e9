"""Identity: bearer tokens from ``API_KEYS``, or one local user when unset."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from turnrelay.errors import Unauthorized

LOCAL_USER = "local"


class Authenticator:
    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = tokens

    @property
    def open(self) -> bool:
        return not self._tokens

    def user_for(self, request: Request) -> str:
        if not self._tokens:
            return LOCAL_USER
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        token = token.strip()
        for known, user in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
        raise Unauthorized("unknown token")
