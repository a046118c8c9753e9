"""strip and transcript_problem on hand-made transcripts: what the end-to-end strip
test cannot make the real CLI write (dropped chains, cycles, odd encodings)."""

from __future__ import annotations

import json

from turnrelay.transcript.strip import strip, transcript_problem


def _line(**entry: object) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def test_children_of_dropped_entries_get_the_nearest_kept_ancestor() -> None:
    user = _line(type="user", uuid="u1", parentUuid=None, message={"content": "hi"})
    data = b"".join(
        [
            user,
            _line(type="mode", uuid="m1", parentUuid="u1"),
            _line(
                type="attachment",
                uuid="p1",
                parentUuid="m1",
                attachment={"type": "prompt_snapshot"},
            ),
            _line(type="assistant", uuid="a1", parentUuid="p1", message={"content": "yo"}),
        ]
    )
    out = strip(data).splitlines(keepends=True)
    assert out[0] == user  # untouched, byte for byte
    assert out[1] == _line(type="assistant", uuid="a1", parentUuid="u1", message={"content": "yo"})
    assert len(out) == 2


def test_attachments_that_reach_the_model_are_kept() -> None:
    data = _line(type="attachment", uuid="e1", parentUuid=None, attachment={"type": "environment"})
    assert strip(data) == data


def test_unparseable_lines_and_lines_without_a_uuid_are_kept() -> None:
    data = b'not json\n{"type":"summary","summary":"x"}\n[1,2]\n{"type":"user","uuid":"u"}'
    assert strip(data) == data


def test_only_the_parent_uuid_changes_in_a_line_of_another_encoding() -> None:
    spaced = (
        b'{"type": "assistant", "uuid": "a1", "parentUuid": "d1", '
        b'"message": {"content": "\\u00e9"}}\r\n'
    )
    data = _line(type="cost-state", uuid="d1", parentUuid="u0") + spaced
    (line,) = strip(data).splitlines(keepends=True)
    assert line.endswith(b"\r\n")
    assert json.loads(line) == {**json.loads(spaced), "parentUuid": "u0"}


def test_a_cycle_of_dropped_entries_ends() -> None:
    data = (
        _line(type="mode", uuid="x", parentUuid="y")
        + _line(type="mode", uuid="y", parentUuid="x")
        + _line(type="user", uuid="u", parentUuid="x")
    )
    (line,) = strip(data).splitlines()
    assert json.loads(line)["parentUuid"] is None  # never a dropped entry's uuid


def test_a_resumable_transcript_has_a_user_and_an_assistant_message() -> None:
    user, assistant = _line(type="user", uuid="u"), _line(type="assistant", uuid="a")
    assert transcript_problem(user + assistant) is None
    assert transcript_problem(user) == "no assistant message"
    assert transcript_problem(b"\x00\xffgarbage\n" + assistant) == "no user message"
    assert transcript_problem(b"") == "no user message"
