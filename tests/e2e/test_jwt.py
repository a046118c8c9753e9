"""JWT bearer tokens against a real `turnrelay serve`: RS256/ES256 from a JWKS
server the test runs (key rotation, bounded refetch), HS256 with a shared
secret, and every way a token can be wrong answering 401 with its code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.procs import FakeLLMProc, Proc, start_serve

ISSUER = "https://id.example.test/"
AUDIENCE = "turnrelay-test"
HS_SECRET = "hs256-shared-secret-of-the-test-0123456789"


@dataclass
class Jwks:
    """A JWKS endpoint on a real socket; ``keys`` may be replaced (rotation)."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    url: str = ""


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    state = Jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, **claims: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


def rsa_key(kid: str) -> Key:
    return Key(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def hmac_token(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed by hand (PyJWT refuses a public key as a secret)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs-1"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-42", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, **over}


@pytest.fixture(scope="module")
def keys(jwks: Jwks) -> dict[str, Key]:
    found = {
        "rs": rsa_key("rs-1"),
        "es": Key("es-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
    }
    jwks.keys = [k.public_jwk() for k in found.values()]
    return found


@pytest.fixture(scope="module")
def jwks_server(
    tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc, jwks: Jwks, keys: dict[str, Key]
) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("jwt"),
        llm,
        {
            "TURNRELAY_JWT_JWKS_URL": jwks.url,
            "TURNRELAY_JWT_ISSUER": ISSUER,
            "TURNRELAY_JWT_AUDIENCE": AUDIENCE,
            "TURNRELAY_JWT_JWKS_REFETCH": "2s",
            "TURNRELAY_API_KEYS": "tok-script=script-user",
        },
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hs_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("jwt-hs"),
        llm,
        {"TURNRELAY_JWT_SECRET": HS_SECRET, "TURNRELAY_JWT_USER_CLAIM": "uid"},
    )
    yield proc
    proc.stop()


def create(server: Proc, token: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/chat/sessions", headers={"authorization": f"Bearer {token}"}, timeout=10
    )


def test_rs256_and_es256_tokens_sign_in_their_subject(
    jwks_server: Proc, keys: dict[str, Key]
) -> None:
    for key in keys.values():
        r = create(jwks_server, key.sign(**claims(sub=f"user-{key.kid}")))
        assert r.status_code == 201, r.text
        assert r.json()["user_id"] == f"user-{key.kid}"
    # the user sees their own session, and another token's user does not
    token = keys["rs"].sign(**claims(sub="owner"))
    sid = create(jwks_server, token).json()["id"]
    other = keys["es"].sign(**claims(sub="stranger"))
    url = f"{jwks_server.url}/api/chat/sessions/{sid}"
    assert httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(url, headers={"authorization": f"Bearer {other}"}).status_code == 404


def test_api_keys_still_work_beside_jwts(jwks_server: Proc) -> None:
    r = create(jwks_server, "tok-script")
    assert r.status_code == 201 and r.json()["user_id"] == "script-user"
    r = create(jwks_server, "tok-unknown")
    assert r.status_code == 401


def test_every_wrong_token_is_401_with_its_code(jwks_server: Proc, keys: dict[str, Key]) -> None:
    rs = keys["rs"]
    impostor = Key("rs-1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    public_pem = rs.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    unsigned = jwt.encode(claims(), None, algorithm="none")  # alg: none
    hs_with_public_key = hmac_token(claims(), public_pem)  # the classic algorithm confusion
    cases = {
        "token_expired": rs.sign(**claims(exp=now - 3600)),
        "token_not_yet_valid": rs.sign(**claims(nbf=now + 3600)),
        "bad_audience": rs.sign(**claims(aud="someone-else")),
        "bad_issuer": rs.sign(**claims(iss="https://evil.example/")),
        "bad_signature": impostor.sign(**claims()),
        "bad_algorithm": unsigned,
        "missing_claim": rs.sign(**{k: v for k, v in claims().items() if k != "exp"}),
        "invalid_token": "abc.def.ghi",
    }
    for code, token in cases.items():
        r = create(jwks_server, token)
        assert r.status_code == 401, (code, r.text)
        assert r.json()["code"] == code, (code, r.json())
        assert "Traceback" not in r.text
    r = create(jwks_server, hs_with_public_key)
    assert (r.status_code, r.json()["code"]) == (401, "bad_algorithm")
    r = create(jwks_server, rs.sign(**claims(sub="")))
    assert (r.status_code, r.json()["code"]) == (401, "missing_claim")
    # a small clock skew is tolerated
    assert create(jwks_server, rs.sign(**claims(exp=now - 5))).status_code == 201


def test_a_rotated_key_is_fetched_and_unknown_kids_refetch_boundedly(
    jwks_server: Proc, jwks: Jwks, keys: dict[str, Key]
) -> None:
    time.sleep(2.1)  # past the refetch interval since the last fetch
    rotated = rsa_key("rs-2")
    jwks.keys = [*jwks.keys, rotated.public_jwk()]
    before = jwks.fetches
    r = create(jwks_server, rotated.sign(**claims(sub="rotated")))
    assert r.status_code == 201 and r.json()["user_id"] == "rotated"
    assert jwks.fetches == before + 1
    # made-up kids: refused, and they cannot make the API hammer the JWKS
    before = jwks.fetches
    for i in range(20):
        bogus = Key(f"nope-{i}", "RS256", rotated.private)
        r = create(jwks_server, bogus.sign(**claims()))
        assert (r.status_code, r.json()["code"]) == (401, "unknown_key")
    assert jwks.fetches - before <= 1


def test_hs256_with_a_shared_secret_and_a_custom_user_claim(hs_server: Proc) -> None:
    now = int(time.time())
    good = jwt.encode({"uid": "supa-7", "exp": now + 60}, HS_SECRET, algorithm="HS256")
    r = create(hs_server, good)
    assert r.status_code == 201 and r.json()["user_id"] == "supa-7"
    wrong = jwt.encode({"uid": "supa-7", "exp": now + 60}, "not-the-secret-" * 3, algorithm="HS256")
    assert create(hs_server, wrong).json()["code"] == "bad_signature"
    no_claim = jwt.encode({"sub": "x", "exp": now + 60}, HS_SECRET, algorithm="HS256")
    assert create(hs_server, no_claim).json()["code"] == "missing_claim"
    # an RS256 token where only HS256 is configured
    rs = rsa_key("k").sign(uid="supa-7", exp=now + 60)
    assert create(hs_server, rs).json()["code"] == "bad_algorithm"
    assert create(hs_server, "not-a-jwt").status_code == 401


def test_serve_listens_beyond_loopback_with_jwts_only(tmp_path: Path) -> None:
    from turnrelay.cli import _check_listening
    from turnrelay.errors import ConfigError
    from turnrelay.settings import Settings

    _check_listening(Settings(jwt_secret=HS_SECRET), "0.0.0.0")
    with pytest.raises(ConfigError):
        _check_listening(Settings(), "0.0.0.0")
