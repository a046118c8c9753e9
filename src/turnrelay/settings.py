"""Settings: data, loaded once by the CLI and passed down.

Every variable has the prefix ``TURNRELAY_`` and a ``.env`` file is honoured.
Durations accept ``250ms``, ``15s``, ``25m``, ``1h`` or a plain number of seconds.
Nothing in the package reads the environment except ``Settings()`` in the CLI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from turnrelay.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``"25m"``, ``"15s"``, ``"250ms"``, ``"1h"`` or a number."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 15s, 25m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True)
class ModelRef:
    """``provider:model`` split at the first colon (``openai:llama3.1:8b``)."""

    provider: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        provider, sep, name = text.strip().partition(":")
        if not sep or not provider or not name:
            raise ValueError(f"model must be provider:model, got {text!r}")
        return cls(provider, name)

    def __str__(self) -> str:
        return f"{self.provider}:{self.name}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TURNRELAY_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = "sqlite+aiosqlite:///./.turnrelay/turnrelay.db"
    broker_url: str = "memory://"
    redis_url: str = "memory://"
    storage_url: str = "file://./.turnrelay/storage"
    # Executors without TURNRELAY_DATABASE_URL reach the database through
    # `turnrelay db-manager` at this address, with this shared secret.
    database_manager_url: str | None = None
    database_manager_secret: str | None = None
    # The db-manager's one pool: every executor's calls share these connections.
    database_manager_pool_size: int = Field(10, ge=1, le=500)
    # Tracing: OTLP/HTTP collector (e.g. http://collector:4318); off when unset.
    otel_endpoint: str | None = None
    # Log lines as text or as JSON (one object per line, with the turn's ids).
    log_format: Literal["text", "json"] = "text"

    # Prefix of broker exchanges/queues and Redis keys: deployments (or tests)
    # sharing one RabbitMQ and Redis stay apart by namespace.
    namespace: str = Field("turnrelay", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    model: str | None = None
    models: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = Field(
        default_factory=list
    )
    num_workers: int = Field(5, ge=1, le=1000)
    executor_port: int = Field(8008, ge=0, le=65535)
    api_keys: str | None = None
    # JWT bearer tokens (beside or instead of API keys): HS256 with a shared
    # secret and/or RS256/ES256 from a JWKS URL; see turnrelay.api.jwt_auth.
    # At least 32 characters: RFC 7518 asks HS256 keys to be as long as the hash.
    jwt_secret: str | None = Field(None, min_length=32)
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_user_claim: str = Field("sub", min_length=1, max_length=128)
    jwt_leeway: Duration = Field(30.0, ge=0, le=600)
    # An unknown `kid` refetches the JWKS at most this often.
    jwt_jwks_refetch: Duration = Field(30.0, ge=0)
    system_prompt: str = (
        "You are a helpful assistant. Answer concisely and use the tools you are given "
        "when they help."
    )

    # Kept below RabbitMQ's consumer timeout (30 min by default): a turn the broker
    # takes back while it still runs would be delivered again and run twice.
    turn_timeout: Duration = 25 * 60.0
    # How long a finished turn's frames stay replayable for late readers.
    stream_retention: Duration = 3600.0
    # None: 30 s for `serve`, 25 min for `executor` (the CLI picks).
    shutdown_grace: Duration | None = None
    max_running_turns_per_user: int = Field(5, ge=1)
    # Turns beyond the running cap wait in the user's FIFO, up to this many; 0
    # turns the FIFO off (429 at the running cap).
    max_waiting_turns_per_user: int = Field(20, ge=0, le=10_000)
    max_queued_turns_per_session: int = Field(10, ge=1)
    # SSE streams one user may hold open on one API process (429 beyond it).
    max_streams_per_user: int = Field(20, ge=1)
    history_tokens: int = Field(32000, ge=256)
    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = Field(
        default_factory=list
    )

    # Lease: ~15 s TTL, refreshed every TTL/3 by the turn's heartbeat, so two
    # missed refreshes still leave the lease held; a crashed executor's session
    # is free again within one TTL.
    lease_ttl: Duration = 15.0
    # Executor liveness: beaten every TTL/6, so an event-loop stall of up to
    # ~2.5 s is no false takeover; a dead or frozen executor's sessions move on
    # within about this long (the lease TTL is only the backstop).
    liveness_ttl: Duration = Field(3.0, gt=0)
    # SSE comment cadence: below common proxy idle timeouts (30-60 s).
    heartbeat_interval: Duration = 10.0
    # How often the sweeper re-publishes a session head turn that was missed.
    sweep_interval: Duration = 30.0
    # Delay before a delivery whose session lease is held elsewhere is retried.
    requeue_delay: Duration = 1.0
    max_attempts: int = Field(3, ge=1, le=10)
    max_message_bytes: int = Field(64 * 1024, ge=1)

    # Webhooks on turn end (completed, failed, cancelled): a default target for
    # turns submitted without `webhook_url`, the signing secret (Standard
    # Webhooks; `whsec_<base64>` or any long text), whether private and
    # loopback targets are allowed, and the retry schedule (doubling from the
    # base, this many attempts in all).
    webhook_url: str | None = None
    webhook_secret: str | None = Field(None, min_length=24)
    webhook_allow_private: bool = False
    webhook_retry_base: Duration = Field(5.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1, le=50)

    # Tools. Working directories of sessions live under the sandbox: the same
    # absolute path on every executor (the Claude CLI keys transcripts by it).
    sandbox_dir: str = "./.turnrelay/sandbox"
    # turnrelay tools offered to models (built-in and `turnrelay.tools` entry
    # points); empty: all of them.
    tools: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = Field(default_factory=list)
    # Tools whose every call waits for the user's approval (beside tools that
    # declare it themselves, like the built-in `save_note`), and how long a
    # request waits for an answer before it counts as denied.
    tools_requiring_approval: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = Field(
        default_factory=list
    )
    approval_timeout: Duration = Field(600.0, gt=0, le=7 * 24 * 3600)
    # Built-in tools of the Claude Code CLI to enable (e.g. `WebSearch,Read`);
    # empty, the safe default: none, so the model cannot run commands or touch files.
    # File tools stay inside the session's directory; `Bash` runs only under
    # bubblewrap, so the executor refuses to start with it where bwrap does not work.
    claude_tools: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = Field(
        default_factory=list
    )
    # Model steps that may call tools in one turn; then the model must answer.
    max_tool_steps: int = Field(8, ge=0, le=100)

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError(
                "TURNRELAY_WEBHOOK_URL needs TURNRELAY_WEBHOOK_SECRET to sign the webhooks"
            )
        return self

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            ModelRef.parse(value)
            return value.strip()
        return None

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        for item in value:
            ModelRef.parse(item)
        return value

    # -- derived ---------------------------------------------------------------------

    def user_tokens(self) -> dict[str, str]:
        """``token -> user_id`` from ``API_KEYS``; empty means single local user."""
        tokens: dict[str, str] = {}
        if not self.api_keys:
            return tokens
        for pair in self.api_keys.split(","):
            pair = pair.strip()
            if not pair:
                continue
            token, sep, user = pair.partition("=")
            if not sep or not token.strip() or not user.strip():
                raise ConfigError(f"TURNRELAY_API_KEYS entry {pair!r} is not token=user_id")
            tokens[token.strip()] = user.strip()
        return tokens

    def jwt_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_jwks_url)

    def authenticated(self) -> bool:
        """Callers are told apart (API keys or JWTs), not one local user."""
        return bool(self.user_tokens()) or self.jwt_enabled()

    def allowed_models(self) -> list[str]:
        """The allow-list; defaults to the default model alone."""
        if self.models:
            return list(self.models)
        return [self.model] if self.model else []

    def grace(self, default: float) -> float:
        return self.shutdown_grace if self.shutdown_grace is not None else default
