"""The db-manager's wire contract: the ``ExecutorStore`` port as typed RPC.

One table, ``METHODS``, names every method an executor may call, the pydantic
model of its parameters, the codec of its answer, and whether it is a
retryable write. The service (``turnrelay.store.rpc_service``) and the client
(``turnrelay.store.rpc_client``) both read it, so the two cannot disagree.

    POST /rpc/{method}            body: the parameters as JSON
      authorization: Bearer <TURNRELAY_DATABASE_MANAGER_SECRET>
      idempotency-key: <call id>  every write; a repeat answers what the first did
    200 {"result": …}
    4xx/5xx {"detail", "code", "error": "<TurnrelayError subclass>"}

An error raised in the service is raised again in the executor as the same
class of the error tree (``error_from_wire``): a ``TurnNotFound`` stays a
``TurnNotFound``, a ``BackendUnavailable`` (the database is down) stays one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
)

from turnrelay import errors
from turnrelay.store.base import (
    TERMINAL,
    ApprovalRecord,
    MessageRecord,
    NewApproval,
    TurnOutcome,
    TurnPause,
    TurnRecord,
)
from turnrelay.store.records import BOOL, NOTHING, STEERS, TURN_OR_NONE, WEBHOOKS

# The largest body either side accepts: a checkpoint carries a whole answer so
# far with its parts; far beyond any real one, small enough to refuse abuse.
MAX_BODY_BYTES = 16 * 1024 * 1024
CALL_ID_HEADER = "idempotency-key"
# A call id: made by the client, one per logical call, reused by its retries.
CALL_ID = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,64}$")])

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Attempt = Annotated[int, Field(ge=0, le=1000)]
Limit = Annotated[int, Field(ge=1, le=5000)]


def _terminal(outcome: TurnOutcome) -> TurnOutcome:
    if outcome.status not in TERMINAL:
        raise ValueError(f"a finished turn's status is terminal, got {outcome.status.value!r}")
    return outcome


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def arguments(self) -> dict[str, Any]:
        """The store method's keyword arguments (records stay records)."""
        return {name: getattr(self, name) for name in type(self).model_fields}


class NoParams(Params):
    pass


class History(Params):
    session_id: Id
    before_seq: int = Field(ge=0)


class TurnId(Params):
    turn_id: Id


class SessionId(Params):
    session_id: Id


class SetCliSession(Params):
    session_id: Id
    cli_session_id: Id


class DispatchNext(Params):
    session_id: Id
    republish_before: AwareDatetime | None = None
    max_running_per_user: int | None = Field(None, ge=1)


class UnpublishedHeads(Params):
    before: AwareDatetime
    limit: Limit = 100


class UndispatchedHeads(Params):
    limit: Limit = 100


class DispatchedActive(Params):
    limit: Limit = 500
    running_only: bool = False


class StartTurn(Params):
    turn_id: Id
    attempt: Attempt


class SavePartial(Params):
    turn_id: Id
    attempt: Attempt
    content: str
    parts: list[dict[str, Any]]


class FinishTurn(Params):
    turn_id: Id
    attempt: Attempt
    outcome: Annotated[TurnOutcome, AfterValidator(_terminal)]


class ClaimWebhooks(Params):
    limit: Limit = 20
    lease: float = Field(30.0, gt=0, le=3600)


class SettleWebhook(Params):
    delivery_id: Id
    attempt: Attempt
    delivered: bool
    status_code: int | None = Field(None, ge=100, le=599)
    error: Annotated[str, StringConstraints(max_length=2000)] | None = None
    retry_in: float | None = Field(None, ge=0, le=86400)


class PauseTurn(Params):
    turn_id: Id
    attempt: Attempt
    pause: TurnPause
    approvals: list[NewApproval] = Field(min_length=1, max_length=100)
    expires_at: AwareDatetime


class TakeSteers(Params):
    turn_id: Id
    attempt: Attempt
    step: int = Field(ge=1, le=10_000)


class ExpireApprovals(Params):
    now: AwareDatetime
    reason: Annotated[str, StringConstraints(max_length=500)]
    limit: Limit = 100


@dataclass(frozen=True)
class Method:
    params: type[Params]
    result: TypeAdapter[Any]
    # A write that changes the database: carries a call id, recorded with its
    # answer, so a retry never runs it twice. Reads are retried as they are.
    write: bool = False


TURN: TypeAdapter[TurnRecord] = TypeAdapter(TurnRecord)
TURNS: TypeAdapter[list[TurnRecord]] = TypeAdapter(list[TurnRecord])
STR_OR_NONE: TypeAdapter[str | None] = TypeAdapter(str | None)

METHODS: dict[str, Method] = {
    "ping": Method(NoParams, NOTHING),
    "history": Method(History, TypeAdapter(list[MessageRecord])),
    "get_turn": Method(TurnId, TURN),
    "cli_session": Method(SessionId, STR_OR_NONE),
    "unpublished_heads": Method(UnpublishedHeads, TURNS),
    "undispatched_heads": Method(UndispatchedHeads, TURNS),
    "dispatched_active": Method(DispatchedActive, TURNS),
    "dispatch_next": Method(DispatchNext, TURN_OR_NONE, write=True),
    "mark_published": Method(TurnId, NOTHING, write=True),
    "start_turn": Method(StartTurn, TURN_OR_NONE, write=True),
    "save_partial": Method(SavePartial, BOOL, write=True),
    "finish_turn": Method(FinishTurn, BOOL, write=True),
    "claim_webhooks": Method(ClaimWebhooks, WEBHOOKS, write=True),
    "settle_webhook": Method(SettleWebhook, NOTHING, write=True),
    "set_cli_session": Method(SetCliSession, NOTHING, write=True),
    "pause_turn": Method(PauseTurn, BOOL, write=True),
    "take_steers": Method(TakeSteers, STEERS, write=True),
    "approvals": Method(TurnId, TypeAdapter(list[ApprovalRecord])),
    "expire_approvals": Method(ExpireApprovals, TURNS, write=True),
}


# errors across the wire --------------------------------------------------------------


def _error_classes() -> dict[str, type[errors.TurnrelayError]]:
    found: dict[str, type[errors.TurnrelayError]] = {}
    pending: list[type[errors.TurnrelayError]] = [errors.TurnrelayError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


ERROR_CLASSES = _error_classes()


def error_to_wire(exc: errors.TurnrelayError) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": exc.detail, "code": exc.code, "error": type(exc).__name__}
    if isinstance(exc, errors.TurnAlreadyActive):
        body["turn_id"] = exc.turn_id
    return body


def error_from_wire(body: Any, status: int) -> errors.TurnrelayError:
    """The service's error as the same class here; a body that names none
    (a proxy's page, a crash) is a plain ``TurnrelayError`` with its status."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return errors.TurnrelayError(f"db-manager answered HTTP {status}")
    cls = ERROR_CLASSES.get(body["error"], errors.TurnrelayError)
    detail = str(body.get("detail") or cls.__name__)
    # Built without the subclass's own __init__ (some take extra arguments):
    # the detail, the code and those extras are what the tree carries.
    exc = cls.__new__(cls)
    errors.TurnrelayError.__init__(exc, detail, code=str(body.get("code") or cls.code))
    if cls is errors.TurnAlreadyActive:
        exc.turn_id = str(body.get("turn_id", ""))  # type: ignore[attr-defined]
    return exc
