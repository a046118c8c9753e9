"""turnrelay's one exception tree.

Every error that crosses a module boundary is a ``TurnrelayError``. Third-party
errors are translated where they enter (``raise BackendUnavailable(...) from
exc``), so generic code never catches ``redis.ConnectionError`` or
``sqlalchemy.exc.OperationalError``. The HTTP layer maps the tree to status
codes in one table (``turnrelay.api.errors``); each class carries its default
``status`` and a stable machine ``code`` for that mapping.

    TurnrelayError
    ├── ConfigError                  settings that cannot work (raised before serving)
    ├── BadRequest              400  malformed JSON, body, cursor
    │   └── InvalidCursor       400
    ├── Unauthorized            401
    ├── NotFound                404
    │   ├── SessionNotFound
    │   ├── TurnNotFound
    │   ├── ObjectNotFound           object storage key absent
    │   └── ApprovalNotFound         no such tool approval request on the turn
    ├── Conflict                409
    │   ├── MessageIdConflict        same message_id, different message
    │   ├── TurnAlreadyActive        multitask=reject
    │   ├── ApprovalAlreadyAnswered  decided otherwise already (or timed out)
    │   ├── TurnNotWaiting           the turn waits for no approval
    │   └── PreconditionFailed       conditional write lost (object storage)
    ├── Gone                    410  cursor expired or trimmed
    ├── PayloadTooLarge         413
    ├── Unprocessable           422
    │   └── UnknownModel
    ├── RateLimited             429  a turn cap is reached
    ├── BackendUnavailable      503  a broker/database/redis/storage is unreachable
    │   └── PublishFailed
    ├── StaleWriter                  a fenced write lost to a newer writer (event log seq, lease)
    ├── LogLost                      a turn's event log vanished under its writer (Redis lost data)
    ├── SchemaOutOfDate              the database needs ``turnrelay migrate``
    └── RuntimeFailure               the model or a tool failed during a turn
        ├── ModelError
        └── ToolError                a tool's own clean failure (``turnrelay.tools.base``)
"""

from __future__ import annotations


class TurnrelayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str = "", *, code: str | None = None) -> None:
        super().__init__(detail or self.__class__.__name__)
        self.detail = detail or self.__class__.__name__
        if code is not None:
            self.code = code


class ConfigError(TurnrelayError):
    code = "config_error"


class BadRequest(TurnrelayError):
    status = 400
    code = "bad_request"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"


class Unauthorized(TurnrelayError):
    status = 401
    code = "unauthorized"


class NotFound(TurnrelayError):
    status = 404
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class TurnNotFound(NotFound):
    code = "turn_not_found"


class ObjectNotFound(NotFound):
    code = "object_not_found"


class ApprovalNotFound(NotFound):
    code = "approval_not_found"


class Conflict(TurnrelayError):
    status = 409
    code = "conflict"


class MessageIdConflict(Conflict):
    code = "message_id_conflict"


class TurnAlreadyActive(Conflict):
    code = "turn_active"

    def __init__(self, detail: str, *, turn_id: str) -> None:
        super().__init__(detail)
        self.turn_id = turn_id


class ApprovalAlreadyAnswered(Conflict):
    """The approval was decided otherwise already (by the user, or by its timeout)."""

    code = "approval_already_answered"


class TurnNotWaiting(Conflict):
    """The turn is not waiting for an approval (it ended, or none was asked)."""

    code = "turn_not_waiting"


class PreconditionFailed(Conflict):
    status = 412
    code = "precondition_failed"


class Gone(TurnrelayError):
    status = 410
    code = "gone"


class PayloadTooLarge(TurnrelayError):
    status = 413
    code = "payload_too_large"


class Unprocessable(TurnrelayError):
    status = 422
    code = "unprocessable"


class UnknownModel(Unprocessable):
    code = "unknown_model"


class RateLimited(TurnrelayError):
    status = 429
    code = "rate_limited"

    def __init__(self, detail: str = "", *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after  # seconds, for the Retry-After header


class BackendUnavailable(TurnrelayError):
    status = 503
    code = "backend_unavailable"


class PublishFailed(BackendUnavailable):
    code = "publish_failed"


class StaleWriter(TurnrelayError):
    code = "stale_writer"


class LogLost(TurnrelayError):
    code = "log_lost"


class SchemaOutOfDate(TurnrelayError):
    code = "schema_out_of_date"


class RuntimeFailure(TurnrelayError):
    code = "runtime_failure"


class ModelError(RuntimeFailure):
    code = "model_error"
