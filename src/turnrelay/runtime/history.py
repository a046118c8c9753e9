"""Bounding a session's history for a model that has no transcript of it.

A runtime without a stored transcript gives the model the session's earlier turns
from the database instead. They are bounded by ``TURNRELAY_HISTORY_TOKENS`` with a
rough, provider-independent estimate (no tokenizer): whole turns are dropped
oldest first, never split, so the model never sees an answer without its question.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby

from turnrelay.store.base import MessageRecord

# Rough and provider-independent; the history bound needs no tokenizer.
CHARS_PER_TOKEN = 4
# What a message costs beyond its text (role and framing tokens).
MESSAGE_OVERHEAD_TOKENS = 4


def bound_history(history: Iterable[MessageRecord], max_tokens: int) -> list[MessageRecord]:
    """The newest whole turns of ``history`` that fit in ``max_tokens``, oldest first.

    Messages without text are left out.
    """
    turns = [
        [m for m in group if m.content and m.role in ("user", "assistant")]
        for _, group in groupby(history, key=lambda m: m.turn_id)
    ]
    kept: list[list[MessageRecord]] = []
    budget = max_tokens
    for turn in reversed(turns):
        cost = sum(len(m.content) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in turn)
        if cost > budget:
            break
        budget -= cost
        kept.append(turn)
    return [message for turn in reversed(kept) for message in turn]
