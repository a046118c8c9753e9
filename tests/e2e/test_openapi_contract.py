"""schemathesis against a real `turnrelay serve`: every operation of the served
OpenAPI document, with valid and invalid input, answers no server error and
only what the document says (status, headers, body; each SSE event and each
chunk of the stream too). A stateful run follows the document's links from a
created session through its routes."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import jsonschema
import pytest
import schemathesis
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import positive_data_acceptance

from tests.conftest import POSTGRES_URL, require_server
from tests.e2e.cluster import _create_db, _drop_db
from tests.procs import FakeLLMProc, Proc, start_serve
from turnrelay.api.openapi import openapi_document
from turnrelay.api.schemas import SESSION_ID, WEBHOOK_URL_PATTERN
from turnrelay.settings import Settings

pytestmark = pytest.mark.slow

# A bounded run: the whole module takes well under 90 s on a small machine.
MAX_EXAMPLES = 50
STATEFUL_STEPS = 8
STATEFUL_EXAMPLES = 20
RUN: dict[str, Any] = {"cases": 0, "operations": set(), "statuses": {}, "streams": 0, "chunks": 0}


# The server's settings; the document it serves is the one built here from them
# (``test_the_served_document_is_the_one_tested`` checks), so pytest can
# collect one test per operation before the server starts.
ENV = {
    "TURNRELAY_MODEL": "openai:fake",
    "TURNRELAY_MODELS": "openai:fake,openai:other",
    "TURNRELAY_API_KEYS": "tok-alice=alice,tok-bob=bob",
    "TURNRELAY_JWT_SECRET": "contract-test-secret-0123456789abcdef",
    # Webhooks on, so `webhook_url` is in the document and each turn's delivery
    # log is filled (``map_body`` sends them all to the fake LLM, which answers 404).
    "TURNRELAY_WEBHOOK_SECRET": "contract-webhook-secret-0123456789",
    "TURNRELAY_WEBHOOK_ALLOW_PRIVATE": "true",
    "TURNRELAY_WEBHOOK_RETRY_BASE": "1",
}
DOCUMENT = openapi_document(
    Settings(
        model=ENV["TURNRELAY_MODEL"],
        models=ENV["TURNRELAY_MODELS"],
        api_keys=ENV["TURNRELAY_API_KEYS"],
        jwt_secret=ENV["TURNRELAY_JWT_SECRET"],
        webhook_secret=ENV["TURNRELAY_WEBHOOK_SECRET"],
        webhook_allow_private=True,
    )
)
WEBHOOK_URL = re.compile(WEBHOOK_URL_PATTERN)
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.update(request_timeout=30)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    database="none",
    # Cases carry no token of their own: ``ApiKey`` sets a valid one, and the
    # ignored_auth check sends requests without it and with a bad one.
    with_security_parameters=False,
)


# Sessions of alice's that generated cases are pointed at (a drawn uuid names
# no session, and would only ever test the 404), and their turns.
SESSIONS: list[str] = []
TURNS: dict[str, list[str]] = {}
HOOK: dict[str, str] = {}  # "url": where the webhooks of generated turns go


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    """`serve` on its own PostgreSQL database: stricter than SQLite about what
    text it stores (no NUL), so input it would choke on shows up as a 500 here."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    db = f"tr_contract_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_db(POSTGRES_URL, db))
    database_url = f"{POSTGRES_URL.rsplit('/', 1)[0]}/{db}"
    proc = start_serve(
        tmp_path_factory.mktemp("contract"), llm, {**ENV, "TURNRELAY_DATABASE_URL": database_url}
    )
    HOOK["url"] = f"http://127.0.0.1:{llm.port}/hook"
    for _ in range(4):
        r = httpx.post(
            f"{proc.url}/api/chat/sessions",
            headers={"authorization": "Bearer tok-alice"},
            timeout=10,
        )
        SESSIONS.append(r.json()["id"])
    yield proc
    proc.stop()
    asyncio.run(_drop_db(POSTGRES_URL, db))


@schema.hook
def map_path_parameters(
    context: Any, path_parameters: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Most cases with a well-formed session id get a real one (never for
    DELETE, which would use them up); a well-formed turn id one of its turns."""
    if not path_parameters:
        return path_parameters
    sid = path_parameters.get("session_id")
    if not SESSIONS or not isinstance(sid, str) or not SESSION_ID.match(sid):
        return path_parameters
    if context.operation.method.upper() == "DELETE" or sid.startswith("0"):
        return path_parameters  # some stay unknown: the 404 is tested too
    real = SESSIONS[int(sid[-2:], 16) % len(SESSIONS)]
    out = {**path_parameters, "session_id": real}
    turn = path_parameters.get("turn_id")
    if isinstance(turn, str) and SESSION_ID.match(turn) and TURNS.get(real):
        out["turn_id"] = TURNS[real][int(turn[-2:], 16) % len(TURNS[real])]
    return out


def test_the_served_document_is_the_one_tested(contract_server: Proc) -> None:
    r = httpx.get(f"{contract_server.url}/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.json() == json.loads(json.dumps(DOCUMENT))


@schema.auth()
class ApiKey:
    """Alice's API key on every case."""

    def get(self, case: Case, ctx: Any) -> str:
        return "tok-alice"

    def set(self, case: Case, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.check
def sse_chunks_conform(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Each SSE event's data is ``[DONE]`` (last) or the JSON of one chunk that
    the document's ``UIMessageChunk`` schema accepts; the stream ends with ``[DONE]``."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    doc = case.operation.schema.raw_schema
    validator = jsonschema.Draft202012Validator(
        {**doc, "$ref": "#/components/schemas/UIMessageChunk"}
    )
    datas = [
        line[len("data: ") :]
        for line in response.content.decode().split("\n")
        if line.startswith("data: ")
    ]
    assert datas and datas[-1] == "[DONE]", f"the stream does not end with [DONE]: {datas[-3:]}"
    for data in datas[:-1]:
        errors = list(validator.iter_errors(json.loads(data)))
        assert not errors, f"chunk {data} does not conform: {errors[0].message}"
    RUN["streams"] += 1
    RUN["chunks"] += len(datas) - 1
    return True


def _record(case: Case, response: Response, kind: str = "stateless") -> None:
    turn = response.headers.get("x-turn-id", [None])[0]
    if response.status_code == 202 and "turn_id" in response.text:
        turn = response.json()["turn_id"]
    sid = (case.path_parameters or {}).get("session_id")
    if turn and sid in SESSIONS and turn not in TURNS.setdefault(sid, []):
        TURNS[sid].append(turn)
    RUN["cases"] += 1
    RUN[kind] = RUN.get(kind, 0) + 1
    RUN["operations"].add(case.operation.label)
    RUN["statuses"][response.status_code] = RUN["statuses"].get(response.status_code, 0) + 1


@schema.hook
def map_body(context: Any, body: Any) -> Any:
    """A well-formed generated ``webhook_url`` names a made-up host: send it to
    one that answers instead (its delivery log then has attempts to show)."""
    url = body.get("webhook_url") if isinstance(body, dict) else None
    if isinstance(url, str) and WEBHOOK_URL.match(url) and HOOK:
        return {**body, "webhook_url": HOOK["url"]}
    return body


def _two_cursors(case: Case, response: Response) -> bool:
    """A stream read naming two different turns or cursors (``after`` and
    ``Last-Event-ID``, or a cursor and ``turn_id``): each parameter is valid
    alone, but together they contradict, a 400 ``invalid_cursor``. OpenAPI has
    no way to say that parameters must agree, so schemathesis calls such a
    request valid; only that exact case is let through as a 400."""
    query = case.query or {}
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    named = [query.get("after"), headers.get("last-event-id")]
    cursors = {c for c in named if isinstance(c, str)}
    turns = {c.split(":")[0] for c in cursors}
    if isinstance(query.get("turn_id"), str):
        turns.add(query["turn_id"])
    return (
        case.operation.label.startswith("GET")
        and case.operation.path.endswith("/stream")
        and response.status_code == 400
        and response.json()["code"] == "invalid_cursor"
        and (len(cursors) > 1 or len(turns) > 1)
    )


def _validate(case: Case, response: Response, **kwargs: Any) -> None:
    excluded = [positive_data_acceptance] if _two_cursors(case, response) else []
    case.validate_response(
        response, additional_checks=[sse_chunks_conform], excluded_checks=excluded, **kwargs
    )


@schema.parametrize()
def test_every_operation_conforms(case: Case, contract_server: Proc) -> None:
    response = case.call(base_url=contract_server.url)
    _record(case, response)
    _validate(case, response)


def test_stateful_links_conform(contract_server: Proc) -> None:
    """Sessions created, then used by the routes the document links them to."""
    machine = schema.as_state_machine()

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": contract_server.url}

        def after_call(self, response: Response, case: Case) -> None:
            super().after_call(response, case)
            _record(case, response, "stateful")

        def validate_response(self, response: Response, case: Case, **kwargs: Any) -> None:
            _validate(case, response)

    Workflow.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


def test_nul_in_stored_text_is_a_bad_request(contract_server: Proc) -> None:
    """PostgreSQL's text holds no NUL: a message or a transport text part with
    one is a 400, not a database error (it was a 500)."""
    headers = {"authorization": "Bearer tok-alice"}
    sid = SESSIONS[0]
    user = {"id": "u-nul", "role": "user", "parts": [{"type": "text", "text": "a\x00b"}]}
    for body in ({"message": "a\x00b"}, {"messages": [user]}):
        r = httpx.post(
            f"{contract_server.url}/api/chat/sessions/{sid}/turns",
            json=body,
            headers=headers,
            timeout=10,
        )
        assert (r.status_code, r.json()["code"]) == (400, "invalid_body"), r.text
        assert "NUL" in r.json()["detail"]


def test_a_turn_shows_its_webhook_deliveries(contract_server: Proc) -> None:
    """GET turn's `webhooks` log, as the document describes it, once the first
    delivery was tried (the fake LLM answers the hook 404, so it stays pending)."""
    headers = {"authorization": "Bearer tok-alice"}
    base = f"{contract_server.url}/api/chat/sessions/{SESSIONS[1]}"
    r = httpx.post(
        f"{base}/turns",
        json={"message": "hook me", "webhook_url": HOOK["url"]},
        headers=headers,
        timeout=10,
    )
    assert r.status_code == 202, r.text
    turn_id = r.json()["turn_id"]
    validator = jsonschema.Draft202012Validator({**DOCUMENT, "$ref": "#/components/schemas/Turn"})
    deadline = time.monotonic() + 20
    while True:
        turn = httpx.get(f"{base}/turns/{turn_id}", headers=headers, timeout=10).json()
        errors = [e.message for e in validator.iter_errors(turn)]
        assert not errors, (turn, errors)
        if turn["webhooks"] and turn["webhooks"][0]["attempts"] >= 1:
            break
        assert time.monotonic() < deadline, turn
        time.sleep(0.2)
    delivery = turn["webhooks"][0]
    assert (delivery["event"], delivery["url"], delivery["last_status"]) == (
        "turn.completed",
        HOOK["url"],
        404,
    )
    assert delivery["status"] == "pending" and delivery["next_attempt_at"]


def test_run_size_and_the_server_log(contract_server: Proc) -> None:
    """After the runs above: how many cases, over which operations, and no
    traceback in the server's log."""
    time.sleep(0.2)
    documented = sum(len(item) for item in DOCUMENT["paths"].values())
    print(
        f"schemathesis: {RUN['cases']} cases ({RUN.get('stateless', 0)} stateless, "
        f"{RUN.get('stateful', 0)} in stateful sequences) over {len(RUN['operations'])} of "
        f"{documented} operations; statuses {dict(sorted(RUN['statuses'].items()))}; "
        f"{RUN['streams']} SSE streams with {RUN['chunks']} chunks checked"
    )
    assert len(RUN["operations"]) == documented, sorted(RUN["operations"])
    assert RUN["cases"] >= documented * 5 and RUN.get("stateful", 0) > 0
    assert 500 not in RUN["statuses"]
    assert RUN["streams"] >= 3 and RUN["chunks"] > RUN["streams"]
    assert {200, 201, 202, 204, 400, 404, 405} <= set(RUN["statuses"])
    assert "Traceback" not in contract_server.log()
