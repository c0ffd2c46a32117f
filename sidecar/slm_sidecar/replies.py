"""What the sidecar changes in a request, and what it reads from (and takes out of) the runtime's reply.

Pure functions and small records, no I/O: `plan_request` decides what goes to the runtime (the client's
request, plus `logprobs` when the client did not ask for them); `Choices.read_reply` / `Choices.read_chunk`
read each choice's text, log-probabilities, finish reason and tool calls from a reply or a streamed chunk
and take out what the sidecar added; `Choices.results` turns them into the built-in server's
`GenerationResult`s, which its accounting (slm_server.service.accounting) turns into the same metrics, log
fields and drift signals as the server's own generations.

The two shapes of log-probabilities the OpenAI-compatible runtimes answer with are both read: OpenAI's
legacy completions shape (`tokens`, `token_logprobs`: vLLM, SGLang, the built-in server) and the chat shape
(`content: [{token, logprob, …}]`: every runtime's chat completions, and llama.cpp's completions too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import orjson

from slm_server.generation.types import GenerationResult, SamplingParams

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GENERATE = "/generate"
# The lowest log-probability counted (e^-100): llama.cpp reports a probability of 0 as the lowest float
# (about -3.4e38), whose mean would overflow exp().
LOGPROB_FLOOR = -100.0
# Without log-probabilities there is no perplexity: NaN in the sum makes the request line's
# `slm.perplexity` null (slm_server.service.jobs computes it from the sum), and `ProxiedResult.perplexity`
# None keeps it out of the histogram and the drift detector.
UNKNOWN = math.nan
# Asked for when the client did not: the sampled token's log-probability, and one alternative (llama.cpp
# reports nothing with 0; 1 is the cheapest it answers).
ADDED_COMPLETION_LOGPROBS = 1
ADDED_CHAT_TOP_LOGPROBS = 1


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What held a request's output to a shape (the built-in server's `OutputGrammar`, as far as the
    accounting and the request line read it): slm_server.metrics.STRUCTURED_FORMATS, and json | text."""

    format: str
    output_type: str


_FORMATS = {
    "json": OutputFormat("json_schema", "json"),
    "regex": OutputFormat("regex", "text"),
    "choice": OutputFormat("choice", "text"),
    "grammar": OutputFormat("grammar", "text"),
}
TOOL_CALLS = OutputFormat("tool_call", "json")


@dataclass(slots=True)
class ProxiedResult(GenerationResult):
    """A generation the runtime made: its token count from the runtime (the ids are only the tokens'
    texts numbered, enough for the repetition check), and no perplexity when the runtime gave no
    log-probabilities."""

    count: int = 0
    logprobs_known: bool = True

    @property
    def output_tokens(self) -> int:
        return self.count

    @property
    def perplexity(self) -> float | None:
        if not self.logprobs_known or not self.count:
            return None
        return math.exp(-self.logprob_sum / self.count)


@dataclass(slots=True)
class Plan:
    """A generation request as the sidecar forwards it."""

    route: str  # the client's: /v1/completions, /v1/chat/completions or /generate
    operation: str  # gen_ai.operation.name: text_completion | chat
    body: bytes  # what goes to the runtime
    stream: bool
    n: int
    params: SamplingParams  # what the client asked (its log line's gen_ai.request.* fields)
    output_format: OutputFormat | None  # declared by the request (tool calls are seen in the reply)
    added_logprobs: bool = False  # the sidecar asked for them: they are taken out of the reply
    strip_absent: bool = False  # taken out by deleting the key (else set to null, as OpenAI's API answers)
    echo_prompt: str | None = None  # /v1/completions with echo: the prompt that starts each choice's text
    # A streamed chunk of a token without text (end of text) is sent by the runtime only with the
    # log-probabilities on (the built-in server), or either way (llama.cpp: False here, the chunk passes).
    token_chunks_need_logprobs: bool = True
    observed: bool = True  # a JSON object the sidecar could read (else forwarded as it came)


def _number(doc: dict[str, Any], key: str) -> Any:
    value = doc.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def sampling_of(doc: dict[str, Any], max_tokens_key: str = "max_tokens") -> SamplingParams:
    """The sampling a request asked for, for its log line: what it sent, None where it left a field out
    (the runtime's defaults apply, which the sidecar does not know)."""
    max_tokens = _number(doc, max_tokens_key)
    if max_tokens is None and max_tokens_key == "max_tokens":
        max_tokens = _number(doc, "max_completion_tokens")
    seed = _number(doc, "seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(doc, "temperature"),
        top_p=_number(doc, "top_p"),
        top_k=_number(doc, "top_k") or 0,
        seed=seed if isinstance(seed, int) else None,
        presence_penalty=_number(doc, "presence_penalty") or 0.0,
        frequency_penalty=_number(doc, "frequency_penalty") or 0.0,
    )


def output_format(doc: dict[str, Any]) -> OutputFormat | None:
    """The shape a request holds its output to: OpenAI's response_format, vLLM's structured_outputs (and
    its older guided_* fields), llama.cpp's json_schema and grammar."""
    response_format = doc.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return OutputFormat(response_format["type"], "json")
    structured = doc.get("structured_outputs")
    if isinstance(structured, dict):
        for key, found in _FORMATS.items():
            if structured.get(key) is not None:
                return found
    for key, found in _FORMATS.items():
        if doc.get(f"guided_{key}") is not None:
            return found
    if doc.get("json_schema") is not None:
        return _FORMATS["json"]
    if doc.get("grammar"):
        return _FORMATS["grammar"]
    return None


# What turns off each runtime's own narrowing of the sampled tokens, where its defaults narrow it without
# the request asking (llama.cpp: top_k 40 and min_p 0.05; vLLM and SGLang: the model's generation_config).
_WHOLE_VOCABULARY: dict[str, dict[str, float]] = {
    "llamacpp": {"top_k": 0, "min_p": 0.0, "typical_p": 1.0},
    "vllm": {"top_k": -1, "min_p": 0.0},
    "sglang": {"top_k": -1, "min_p": 0.0},
}


def degrade(doc: dict[str, Any], runtime: str = "openai") -> None:
    """Fault injection's degraded output: sample far from the model's choices — the highest temperature
    OpenAI's API allows, over every token (`runtime`'s own top-k and min-p turned off where it has them).
    The log-probabilities the runtime reports are the model's own, so perplexity rises as it does for the
    built-in server's uniform sampling."""
    doc["temperature"] = 2.0
    doc["top_p"] = 1.0
    for key in ("top_k", "min_p", "typical_p"):
        doc.pop(key, None)
    doc.update(_WHOLE_VOCABULARY.get(runtime, {}))


def plan_request(
    route: str,
    raw: bytes,
    *,
    quality_logprobs: bool,
    strip_absent: bool,
    degraded: bool = False,
    runtime: str = "openai",
) -> Plan:
    """What goes to the runtime for a client's OpenAI request (`route`: COMPLETIONS or CHAT)."""
    operation = "chat" if route == CHAT else "text_completion"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):  # the runtime says what is wrong with it
        return Plan(route, operation, raw, False, 1, sampling_of({}), None, observed=False)
    stream = doc.get("stream") is True
    n = doc.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    changed = False
    if degraded:
        degrade(doc, runtime)
        changed = True
    added = False
    if quality_logprobs:
        if route == CHAT:
            if doc.get("logprobs") is not True and doc.get("top_logprobs") is None:
                doc["logprobs"] = True
                doc["top_logprobs"] = ADDED_CHAT_TOP_LOGPROBS
                added = True
        elif doc.get("logprobs") is None:
            doc["logprobs"] = ADDED_COMPLETION_LOGPROBS
            added = True
    echo_prompt = None
    if route == COMPLETIONS and doc.get("echo") is True:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        echo_prompt = prompt if isinstance(prompt, str) else ""
    body = orjson.dumps(doc) if (added or changed) else raw
    return Plan(
        route,
        operation,
        body,
        stream,
        n,
        sampling_of(doc if not degraded else orjson.loads(raw)),
        output_format(doc),
        added_logprobs=added,
        strip_absent=strip_absent,
        echo_prompt=echo_prompt,
        token_chunks_need_logprobs=runtime != "llamacpp",
    )


def logprob_entries(logprobs: Any) -> list[tuple[str, float | None]]:
    """(token text, log-probability) of each token of a choice's (or a chunk's) `logprobs`, in either shape."""
    if not isinstance(logprobs, dict):
        return []
    content = logprobs.get("content")
    if isinstance(content, list):
        return [(str(e.get("token", "")), e.get("logprob")) for e in content if isinstance(e, dict)]
    values = logprobs.get("token_logprobs")
    if isinstance(values, list):
        tokens = logprobs.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != len(values):
            tokens = [""] * len(values)
        return [(str(t), v) for t, v in zip(tokens, values, strict=True)]
    return []


class ChoiceState:
    """One choice's reply, as it comes."""

    __slots__ = ("finish", "logprobs", "pieces", "saw_logprobs", "text", "times", "tokens", "tool_calls")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.pieces: list[str] = []  # streamed pieces of text: the tokens, when no log-probabilities came
        self.tokens: list[str] = []
        self.logprobs: list[float | None] = []
        self.times: list[float] = []  # perf_counter() when each token arrived (streams)
        self.finish: str | None = None
        self.tool_calls: list[Any] = []
        self.saw_logprobs = False

    def add_logprobs(self, entries: list[tuple[str, float | None]], now: float | None) -> None:
        self.saw_logprobs = True
        for token, value in entries:
            self.tokens.append(token)
            self.logprobs.append(value)
        if now is not None:
            self.times.extend([now] * len(entries))


def _finish_reason(reason: Any) -> str:
    """The runtime's finish reason in the built-in server's closed set (slm_server.metrics.FINISH_REASONS)."""
    if reason == "length":
        return "length"
    if reason in ("abort", "cancelled"):
        return "abort"
    if reason is None:
        return "error"  # a reply that never said how it ended
    return "stop"  # stop, eos, tool_calls, content_filter, …


def _complete_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


class Choices:
    """Every choice of one reply, read from the whole reply or chunk by chunk."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.by_index: dict[int, ChoiceState] = {}
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens = 0
        self.ended = False  # a chunk said finish_reason for every choice it started

    def state(self, choice: dict[str, Any], position: int) -> ChoiceState:
        index = choice.get("index", position)
        index = index if isinstance(index, int) else position
        found = self.by_index.get(index)
        if found is None:
            found = self.by_index[index] = ChoiceState()
        return found

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = details["cached_tokens"]

    def _strip(self, choice: dict[str, Any]) -> None:
        if self.plan.strip_absent:
            choice.pop("logprobs", None)
        else:
            choice["logprobs"] = None

    def read_reply(self, doc: Any) -> bool:
        """Read a whole (unstreamed) reply; take out what the sidecar added. True when `doc` changed."""
        if not isinstance(doc, dict):
            return False
        self._usage(doc.get("usage"))
        changed = False
        choices = doc.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            state = self.state(choice, position)
            if self.plan.route == CHAT:
                message = choice.get("message")
                message = message if isinstance(message, dict) else {}
                content = message.get("content")
                if isinstance(content, str):
                    state.text.append(content)
                calls = message.get("tool_calls")
                if isinstance(calls, list):
                    state.tool_calls.extend(calls)
            else:
                text = choice.get("text")
                if isinstance(text, str):
                    state.text.append(text)
            if "logprobs" in choice:
                entries = logprob_entries(choice["logprobs"])
                if entries or choice["logprobs"] is not None:
                    state.add_logprobs(entries, None)
                if self.plan.added_logprobs:
                    self._strip(choice)
                    changed = True
            state.finish = choice.get("finish_reason")
        self.ended = True
        return changed

    def read_chunk(self, doc: Any, now: float) -> bool | None:
        """Read one streamed chunk (arrived at `now`, perf_counter); take out what the sidecar added.
        True when `doc` changed; None when nothing is left of it that the runtime would have sent without
        the added log-probabilities (a chunk that carried only a token without text, the end-of-text
        token's: the client gets no chunk in its place, as from the runtime without them)."""
        if not isinstance(doc, dict):
            return False
        self._usage(doc.get("usage"))
        changed = False
        choices = doc.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            state = self.state(choice, position)
            if self.plan.route == CHAT:
                delta = choice.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                piece = delta.get("content")
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    state.tool_calls.extend(calls)
            else:
                piece = choice.get("text")
            entries = logprob_entries(choice.get("logprobs"))
            if entries:
                state.add_logprobs(entries, now)
            elif isinstance(piece, str) and piece:
                state.times.append(now)  # a piece of text without log-probabilities: one token, at least
                state.pieces.append(piece)
            if isinstance(piece, str):
                state.text.append(piece)
            if "logprobs" in choice and self.plan.added_logprobs:
                self._strip(choice)
                changed = True
            reason = choice.get("finish_reason")
            if reason is not None:
                state.finish = reason
        if (
            changed
            and self.plan.token_chunks_need_logprobs
            and isinstance(choices, list)
            and choices
            and all(_only_logprobs(c, self.plan.route) for c in choices)
        ):
            return None
        return changed

    def results(self) -> tuple[list[ProxiedResult], OutputFormat | None]:
        """Each choice's generation, in index order, and the format that held the output (tool calls
        seen in the reply count as one)."""
        declared = self.plan.output_format
        made_calls = any(state.tool_calls for state in self.by_index.values())
        form = declared if declared is not None else (TOOL_CALLS if made_calls else None)
        results = []
        single = len(self.by_index) == 1
        for index in sorted(self.by_index):
            state = self.by_index[index]
            text = "".join(state.text)
            echo = self.plan.echo_prompt
            tokens, values = state.tokens, state.logprobs
            if echo is not None:
                if echo and text.startswith(echo):
                    text = text[len(echo) :]
                if self.prompt_tokens is not None and len(values) > self.prompt_tokens:
                    tokens, values = tokens[self.prompt_tokens :], values[self.prompt_tokens :]
            known = state.saw_logprobs and all(isinstance(v, int | float) for v in values)
            if known:
                count = len(values)
                total = sum(max(float(cast(float, v)), LOGPROB_FLOOR) for v in values)
            else:
                count = len(state.pieces) if state.pieces else len(text.split())
                if single and self.completion_tokens is not None:
                    count = self.completion_tokens
                total = UNKNOWN
            pieces = tokens if known else (state.pieces or text.split())
            numbering: dict[str, int] = {}
            ids = [numbering.setdefault(piece, len(numbering)) for piece in pieces]
            complete = None
            if form is not None and form.output_type == "json":
                if form is TOOL_CALLS:
                    calls = _merged(state.tool_calls)
                    complete = bool(calls) and all(_call_complete(call) for call in calls)
                else:
                    complete = _complete_json(text)
            results.append(
                ProxiedResult(
                    token_ids=ids,
                    text=text,
                    finish_reason=_finish_reason(state.finish),
                    prompt_tokens=self.prompt_tokens or 0,
                    logprob_sum=total,
                    token_times=state.times,
                    cached_tokens=self.cached_tokens,
                    structured_complete=complete,
                    count=count,
                    logprobs_known=known,
                )
            )
        return results, form


def _call_complete(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return isinstance(arguments, str) and _complete_json(arguments)


def _merged(calls: list[Any]) -> list[Any]:
    """Tool calls whole: a stream sends each call in pieces (by `index`), its arguments split among them."""
    if not any(isinstance(call, dict) and "index" in call for call in calls):
        return calls
    whole: dict[Any, dict[str, Any]] = {}
    for call in calls:
        if not isinstance(call, dict):
            continue
        merged = whole.setdefault(call.get("index"), {"function": {"arguments": ""}})
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            merged["function"]["arguments"] += function["arguments"]
    return list(whole.values())


def _only_logprobs(choice: Any, route: str) -> bool:
    """A streamed choice with neither text nor anything else once its log-probabilities are out."""
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return False
    if route == CHAT:
        delta = choice.get("delta")
        return isinstance(delta, dict) and not any(value not in (None, "") for value in delta.values())
    return not choice.get("text")
