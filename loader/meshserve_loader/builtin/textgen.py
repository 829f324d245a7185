"""Text generation for the built-in runtime's OpenAI endpoints (issue 17, item 4):
/v1/completions and /v1/chat/completions, plain and streamed (docs/design/adapters.md,
"Generation").

No built-in format generates text. A user's model class does, MLServer style (the `custom`
format), with either or both of:

- `complete(prompt: str, **params)` -> str, or an iterable of str (one token each, streamed as
  they come); either may be async (a coroutine, an async generator);
- `chat(messages: list[dict], **params)` -> the same. A class with only `complete` serves chat
  too: the messages are rendered as "role: content" lines ending in "assistant:".

A class that also has `detokenize(tokens: list[int]) -> str` takes prompts as token arrays
(OpenAI's `prompt: [1, 2, 3]` or `[[1, 2], [3]]`): each is turned into text with it, on the
inference thread, and `complete` gets the text; usage counts the array's length. Without it a
token-array prompt is a 400 naming `prompt`.

`params` are the request's sampling parameters (max_tokens, temperature, top_p, seed, stop,
presence_penalty, frequency_penalty, user), those the method's signature accepts. Whatever the
model does with them, the runtime enforces `max_tokens` (finish_reason "length") and `stop`
(the text ends before the first stop string, finish_reason "stop") on what it yields, so a
model that ignores them is still bounded (without max_tokens: 16 for completions, OpenAI's
default; 4,096 for chat; 256 on v2). `n` runs the model n times (seed + i when a seed is
given). `usage` counts tokens with the class's `count_tokens(text)` if it has one, else
whitespace-separated words; completion tokens are the pieces taken (a str answer counts as its
words). The same class serves v2 infer: a BYTES input of prompts, a BYTES `text` output.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from meshserve_loader.builtin.codec import CodecError, InferRequest

# The sampling parameters handed to the model (those its method accepts).
PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "user")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128  # OpenAI's own limit
MAX_STOPS = 4  # OpenAI's own limit
# When the request sets no max_tokens: OpenAI's own default for completions; for chat (OpenAI:
# the model's context) and v2, a bound, so that a model that never ends holds no thread forever.
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 4096, "v2": 256}
_WORD = re.compile(r"\s*\S+\s*")


class GenError(ValueError):
    """The client's request is wrong: a 400 naming `param`."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenRequest:
    chat: bool
    inputs: list[Any]  # prompts (completions) or one message list (chat)
    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS["v2"]
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    tokens: bool = False  # the prompts are token arrays (`detokenize`)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
        raise GenError(f"'{name}' must be a number from {lo:g} to {hi:g}, got {v!r}", name)


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise GenError(f"'{name}' must be an integer of at least {lo}{'' if hi is None else f' and at most {hi}'}, got {v!r}", name)
    return v


def _same_as_any(v: Any, values: tuple[Any, ...]) -> bool:
    """`v in values`, types included: in Python 0 == False, and logprobs 0 asks for something."""
    return any(type(v) is type(x) and v == x for x in values)


def parse(body: dict[str, Any], chat: bool) -> GenRequest:
    """The request's generation fields, checked as OpenAI checks them (GenError: a 400)."""
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise GenError("'messages' must be a non-empty list of messages", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise GenError(f"messages[{i}] must be an object with a 'role' ({', '.join(ROLES)})", f"messages[{i}].role")
            c = m.get("content")
            if c is not None and not isinstance(c, str) and not (isinstance(c, list) and all(isinstance(p, dict) for p in c)):
                raise GenError(f"messages[{i}].content must be a string or a list of content parts", f"messages[{i}].content")
        inputs: list[Any] = [msgs]
        tokens = False
    else:
        inputs, tokens = _prompts(body.get("prompt"))
    n = _int(body, "n", 1, MAX_N) or 1
    max_tokens = _int(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens", 1)
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS["chat" if chat else "completion"]
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if (stop is not None and not isinstance(stop, (str, list))) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise GenError(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _int(body, "seed", -(2**63))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise GenError("'stream' must be true or false", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict)):
        raise GenError("'stream_options' is allowed only with stream: true, as an object", "stream_options")
    # What this runtime does not do, each with the values that ask for nothing.
    refused = [k for k, nothing in (("logprobs", (None, False)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                                    ("best_of", (None, 1)), ("suffix", (None, ""))) if not _same_as_any(body.get(k), nothing)]
    # Chat's structured output and tool calls: the runtime could not keep their promise (valid
    # JSON, a tool call) for a class that only yields text, so they are refused, not ignored.
    refused += [k for k, nothing in (("tools", (None, [])), ("tool_choice", (None, "none")), ("functions", (None, [])),
                                     ("function_call", (None, "none")), ("response_format", (None, {"type": "text"})))
                if body.get(k) not in nothing]
    if refused:
        raise GenError(f"'{refused[0]}' is not supported by this runtime", refused[0])
    params = {k: body[k] for k in PARAMS if body.get(k) is not None}
    params["max_tokens"] = max_tokens
    return GenRequest(chat, inputs, n, max_tokens, stops, stream, bool((opts or {}).get("include_usage")), params, tokens=tokens)


def _is_token(v: Any) -> bool:
    return type(v) is int and v >= 0  # not bool: true is not a token


def _prompts(p: Any) -> tuple[list[Any], bool]:
    """OpenAI's four shapes of `prompt`: a string, a list of strings, a token array, a list of
    token arrays. (prompts, whether they are token arrays)."""
    if isinstance(p, str):
        return [p], False
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return p, False
        if all(_is_token(x) for x in p):
            return [p], True
        if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in p):
            return p, True
    raise GenError("'prompt' must be a string, a non-empty list of strings, a token array (integers of at least 0) "
                   "or a non-empty list of non-empty token arrays", "prompt")


def _method(model: Any, name: str) -> Callable[..., Any] | None:
    for obj in (model, getattr(model, "obj", None)):  # UserModel wraps the user's object as `.obj`
        fn = getattr(obj, name, None)
        if callable(fn):
            return fn
    return None


def render_chat(messages: list[dict[str, Any]]) -> str:
    """Messages as a prompt, for a model that only completes."""
    lines = [f"{m['role']}: {content_text(m.get('content'))}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def content_text(c: Any) -> str:
    if isinstance(c, list):  # content parts: only the text ones carry text
        return "".join(str(p.get("text", "")) for p in c if p.get("type") == "text")
    return c or ""


def generator(model: Any, chat: bool) -> Callable[..., Any] | None:
    """What generates for this endpoint: the class's `chat`/`complete`, or None."""
    if chat:
        fn = _method(model, "chat")
        if fn is not None:
            return fn
        complete = _method(model, "complete")
        return (lambda messages, **p: complete(render_chat(messages), **_accepted(complete, p))) if complete else None
    return _method(model, "complete")


def detokenizer(model: Any) -> Callable[[list[int]], Any] | None:
    """The class's `detokenize(tokens) -> str`, which token-array prompts need, or None."""
    return _method(model, "detokenize")


def counter(model: Any) -> Callable[[str], int]:
    fn = _method(model, "count_tokens")
    return (lambda s: int(fn(s))) if fn else (lambda s: len(s.split()))


def _accepted(fn: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return params
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return params
    return {k: v for k, v in params.items() if k in sig.parameters}


def _sync(agen: Any) -> Iterator[str]:
    """An async generator's items, on an event loop of this (inference) thread's own."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def pieces(out: Any) -> Iterable[str]:
    """A model's answer as tokens: an iterable's items (an async one's too), or a str's words
    (spacing kept). An awaitable is awaited first (`async def complete`)."""
    if inspect.isawaitable(out):
        out = asyncio.run(out)  # inference threads have no event loop of their own
    if hasattr(out, "__anext__"):
        return _sync(out)
    if isinstance(out, str):
        return _WORD.findall(out) or ([out] if out else [])
    if isinstance(out, (bytes, bytearray)) or not isinstance(out, Iterable):
        raise TypeError(f"a generating model must return a str or an iterable of str, got {type(out).__name__}")
    return out


class StopScanner:
    """Text fed piece by piece, let out as soon as no stop string can be starting in it."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str = "stop"
    tokens: int = 0


def run_choice(fn: Callable[..., Any], arg: Any, req: GenRequest, index: int, emit: Callable[[int, str], None] | None,
               cancelled: threading.Event) -> Choice:
    """One choice: the model's pieces, cut at max_tokens and the first stop string. `emit`
    gets the text as it becomes final (streaming). Runs on an inference thread."""
    params = dict(req.params)
    if "seed" in params and req.n > 1:
        params["seed"] = int(params["seed"]) + index % req.n
    it: Iterator[str] = iter(pieces(fn(arg, **_accepted(fn, params))))
    scan, choice, parts, stopped = StopScanner(req.stop), Choice(index), [], False
    try:
        for piece in it:
            if cancelled.is_set():
                break
            if not isinstance(piece, str):
                raise TypeError(f"a generating model must yield str, got {type(piece).__name__}")
            choice.tokens += 1
            text, stopped = scan.feed(piece)
            if text:
                parts.append(text)
                if emit:
                    emit(index, text)
            if stopped:
                break
            if choice.tokens >= req.max_tokens:
                choice.finish_reason = "length"
                break
        if not stopped:  # ended without a stop string: what was held back is text after all
            rest = scan.flush()
            if rest:
                parts.append(rest)
                if emit:
                    emit(index, rest)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()  # a generator's own cleanup (freeing a KV cache, say) runs now, not at GC
    choice.text = "".join(parts)
    return choice


def prompt_tokens(model: Any, req: GenRequest) -> int:
    if req.tokens:
        return sum(len(p) for p in req.inputs)
    count = counter(model)
    if req.chat:
        return sum(count(content_text(m.get("content"))) for m in req.inputs[0])
    return sum(count(p) for p in req.inputs)


def generate(model: Any, req: GenRequest, emit: Callable[[int, str], None] | None = None,
             cancelled: threading.Event | None = None) -> tuple[list[Choice], int]:
    """Every choice (prompt i, sample j is index i * n + j, as OpenAI numbers them) and the
    prompt's token count. Runs on an inference thread."""
    fn = generator(model, req.chat)
    assert fn is not None
    stop = cancelled or threading.Event()
    args = req.inputs if not req.tokens else [_detokenized(model, p) for p in req.inputs]
    choices = [run_choice(fn, arg, req, i * req.n + j, emit, stop) for i, arg in enumerate(args) for j in range(req.n)]
    return choices, prompt_tokens(model, req)  # counted once whatever n is, as OpenAI does


def _detokenized(model: Any, tokens: list[int]) -> str:
    detok = detokenizer(model)
    assert detok is not None  # the endpoint refused token arrays for a model without it
    text = detok(list(tokens))
    if not isinstance(text, str):
        raise TypeError(f"detokenize() must return a str, got {type(text).__name__}")
    return text


def usage(prompt: int, choices: list[Choice]) -> dict[str, int]:
    done = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def response_body(rid: str, model: str, req: GenRequest, choices: list[Choice], prompt: int) -> dict[str, Any]:
    if req.chat:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for c in choices]
        kind = "chat.completion"
    else:
        out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": out, "usage": usage(prompt, choices)}


def chunk(rid: str, model: str, chat: bool, created: int, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed event in OpenAI's chunk format."""
    doc: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                           "model": model, "choices": choices}
    if usage_ is not None:
        doc["usage"] = usage_
    return doc


def delta(chat: bool, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    if chat:
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if text is not None:
            d["content"] = text
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


def v2_predict(model: Any, req: InferRequest) -> dict[str, np.ndarray]:
    """A generating class on the v2 path: a BYTES input of prompts, a BYTES `text` output, each
    at most DEFAULT_MAX_TOKENS["v2"] pieces."""
    fn = generator(model, chat=False)
    if fn is None or len(req.inputs) != 1 or req.inputs[0].array.dtype != object:
        raise CodecError("this model generates text: send one BYTES input of prompts")
    prompts = [v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in req.inputs[0].array.reshape(-1)]
    gen = GenRequest(False, prompts)
    texts = [run_choice(fn, p, gen, i, None, threading.Event()).text for i, p in enumerate(prompts)]
    return {"text": np.array([t.encode() for t in texts], dtype=object)}
