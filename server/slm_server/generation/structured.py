"""Structured output: generation held to a JSON schema (OpenAI's `response_format`, tool calls), or
to a regular expression, a list of choices or a grammar (vLLM's `structured_outputs`).

A request's `response_format` of `json_schema` (or `json_object`, any JSON object) is compiled, with
the model's tokenizer, into a grammar by llguidance (guidance-ai/llguidance, the library behind
vLLM's `guidance` backend and llama.cpp's JSON schemas). Before each token of such a generation is
chosen, the grammar's matcher gives the set of tokens that keep the output a valid prefix of some
document the schema accepts, and every other token's logit becomes -inf; the chosen token then
advances the matcher. The generation ends ("stop") as soon as the document is complete, and may
end earlier on the end-of-text token only where the document could end. A generation cut short
(max_tokens, a stop string, a timeout) returns an incomplete document, as OpenAI's does; the
`slm_structured_outputs_total{result="incomplete"}` series counts them.

Like logit_bias, the mask changes the choice only: the reported log-probabilities and the
perplexity stay the model's own.

The JSON is written as Python's `json.dumps` writes it (`{"a": 1, "b": [2, 3]}`): one space after
`:` and `,`, no other whitespace. Free whitespace would let a model pad the document with spaces and
newlines until max_tokens (xgrammar's `any_whitespace=False`, vLLM's `disable_any_whitespace`, for
the same reason).

Compiled grammars are kept (least recently used out) by the schema's canonical text, so a client
that sends the same schema with every request compiles it once; each generation works on its own
copy of the compiled matcher.

A grammar comes from a client, so its cost is bounded: llguidance's limits are set here (`LIMITS`,
llguidance's documented defaults written out, so that a new release cannot loosen them, and errors
that do not echo the grammar), the service compiles off the event loop within the request's
admission and `grammar_compile_timeout_seconds`, and a schema nested past what can be written down
is refused before llguidance sees it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("slm_server.engine")

_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # JsonCompileOptions
# Per matcher: rows of a grammar production, lexer fuel to build it (~50k/ms) and per token (~14k/ms),
# Earley items per token, lexer states (1-2 kB each), grammar symbols.
LIMITS: dict[str, Any] = {
    "max_items_in_row": 2_000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
    "precompute_large_lexemes": True,
    "verbose_errors": False,
}

_CACHED_GRAMMARS = 64
_TEXT_FORMATS = frozenset({"regex", "choice", "grammar"})  # the others are JSON


class GrammarError(ValueError):
    """A grammar that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GrammarFailed(RuntimeError):
    """A grammar that compiled but went past llguidance's limits while a generation followed it (too
    many parser items at some token): the request's grammar's fault, not the server's."""


class OutputGrammar:
    """A compiled grammar: immutable, shared by the choices of a request and by later requests."""

    __slots__ = ("_matcher", "format")

    def __init__(self, matcher: Any, format: str):
        self._matcher = matcher  # never advanced (so shared safely across threads): each generation advances a copy
        self.format = format

    @property
    def output_type(self) -> str:
        """What the client asked for, as OTel GenAI's `gen_ai.output.type` says it: json or text."""
        return "text" if self.format in _TEXT_FORMATS else "json"

    def start(self) -> GrammarState:
        """The state of one generation held to this grammar."""
        return GrammarState(self._matcher.deep_copy())


class GrammarState:
    """One generation's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any):
        self._matcher = matcher  # used by one thread at a time: the scheduler's, or a grammar thread it waits for

    def refused(self, vocab_size: int) -> np.ndarray:
        """Per token id below `vocab_size` (a position's logits' width), True where the grammar refuses it."""
        # One bit per token, little-endian in bytes; unpacked by numpy, ~2x faster than shifting int32
        # words in torch on a CPU. (llguidance.torch's helpers would import torch.compile's machinery,
        # seconds on the first structured request, for a kernel this does in two calls.)
        matcher = self._matcher
        mask = matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarFailed(f"the output's grammar went past the parser's limits: {matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), count=vocab_size, bitorder="little")
        return np.logical_not(bits.view(np.bool_))

    def advance(self, token: int) -> bool:
        """Take the chosen token; True when the document is complete (nothing but the end may follow)."""
        matcher = self._matcher
        if not matcher.consume_token(token):
            if matcher.is_error():  # a limit reached while taking the token
                raise GrammarFailed(f"the output's grammar went past the parser's limits: {matcher.get_error()}")
            # The mask allows only tokens the matcher takes: this is a bug, not the request's fault.
            raise RuntimeError(f"structured output: the grammar refused token {token}: {matcher.get_error()}")
        return bool(matcher.is_stopped())

    def complete(self) -> bool:
        """Whether the output so far is a whole document the schema accepts."""
        return bool(self._matcher.is_accepting())


class GrammarCompiler:
    """Compiles schemas into grammars over one model's tokenizer; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]):
        import llguidance
        import llguidance.hf

        # The model's output width, which may exceed the tokenizer's (padded embeddings): the extra
        # ids are not tokens, and the grammar never allows them.
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=max(vocab_size, len(tokenizer)), eos_token=sorted(eos_ids) or None
        )
        self.limits = llguidance.LLParserLimits(**LIMITS)
        self._grammars: OrderedDict[bytes, OutputGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(format: str, spec: Any, param: str) -> bytes:
        """The cache key of `spec`: its canonical text (orjson, in C: a large schema's costs milliseconds).
        GrammarError when it cannot be written: nested past orjson's 254 levels (llguidance's own
        recursion limit, nearer 100, refuses less deep ones with a message)."""
        try:
            return format.encode() + orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError as exc:
            raise GrammarError(f"{param}: {exc}", param) from None

    def cached(self, key: bytes) -> OutputGrammar | None:
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
            return grammar

    def compile(self, key: bytes, format: str, spec: Any, param: str) -> OutputGrammar:
        """The grammar of `spec`: a JSON Schema (formats json_schema and tool_call; None for
        json_object, any JSON object), a regular expression (regex), a list of strings (choice) or a
        Lark grammar (grammar). GrammarError naming `param` (the request field it came from) when
        llguidance cannot compile it. Slow for a large schema (it releases the GIL): call it off the
        event loop."""
        import llguidance

        try:
            if format == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(spec)
            elif format == "choice":
                text = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
            elif format == "grammar":
                text = llguidance.LLMatcher.grammar_from_lark(spec)
            else:
                # As JSON text (the key's): llguidance reads a string without walking Python objects
                # while it holds the GIL.
                schema = key[len(format) :].decode() if spec is not None else '{"type": "object"}'
                text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"{param}: {exc}", param) from None
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=self.limits)
        if not matcher.is_error():
            # The first token's mask, here: a grammar whose start already goes past the parser's limits
            # (a choice among thousands of rows, a lexeme matching too much) fails now, with a 400, and
            # not in the first step of the generation.
            matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(f"{param}: {matcher.get_error()}", param)
        grammar = OutputGrammar(matcher, format)
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > _CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar


def grammar_compiler(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> GrammarCompiler | None:
    """The model's compiler, or None (logged) when its tokenizer cannot have one: llguidance needs
    a fast (Rust) tokenizer, as vLLM's guidance backend does."""
    if not getattr(tokenizer, "is_fast", False):
        log.warning(
            "structured output unavailable: the tokenizer is not a fast one",
            extra={"fields": {"event": "structured_output_unavailable"}},
        )
        return None
    try:
        return GrammarCompiler(tokenizer, vocab_size, eos_ids)
    except Exception:  # an unusual tokenizer: the model still serves, without response_format
        log.warning(
            "structured output unavailable: llguidance could not read the tokenizer",
            exc_info=True,
            extra={"fields": {"event": "structured_output_unavailable"}},
        )
        return None
