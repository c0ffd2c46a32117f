"""Generated tokens into text deltas, as they come (streaming), with stop strings."""

from __future__ import annotations

from collections.abc import Callable

from slm_server.generation.types import GenerationResult, OnText


class TextTracker:
    """Turns a growing token list into text deltas, holding back what may still change.

    Incremental detokenization, as TGI and vLLM do it: a step decodes a window of the output that
    starts one step back, and the new text is the window's text after the text of its tokens
    already consumed. A step's cost does not grow with the output (decoding the whole output at
    every step cost 350 µs a token by the 2,048th, `bench/bench_detokenize.py`), and starting the
    window at earlier tokens keeps tokenizers that drop a leading space at the start of a decode
    (SentencePiece: Llama 2, Mistral, Phi-3) from dropping it between two steps. Tokens whose text
    ends in U+FFFD (a character whose bytes span tokens) or adds nothing (a skipped special token)
    stay unconsumed until a later token completes them; text that could be the start of a stop
    string is held back until it cannot be.
    """

    __slots__ = ("_decode", "_emitted", "_hold", "_prefix", "_read", "_seen", "_stopped", "_stops", "text")

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._prefix = 0  # the decode window's first token
        self._read = 0  # the tokens before this one are in `text`
        self._seen = 0  # tokens passed to `update`
        self._emitted = 0  # characters of `text` handed out
        self._stopped = False
        self.text = ""  # the text of the consumed tokens, cut before a stop string once one appears

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """Returns (new text safe to emit, whether a stop string was reached)."""
        self._seen = len(ids)
        self._consume(ids, final=False)
        if self._stopped:
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._hold if self._stops else len(self.text)), False

    def finish(self, ids: list[int]) -> str:
        """The rest of the text, once no token follows (of `ids` up to the last `update`'s length:
        a token after it, the end-of-sequence one, is not text)."""
        if not self._stopped:
            self._consume(ids[: self._seen], final=True)
        return self._take(len(self.text))

    def _consume(self, ids: list[int], final: bool) -> None:
        if self._stopped or len(ids) <= self._read:
            return
        before = self._decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = self._decode(ids[self._prefix :])
        if final:
            window = window.rstrip("\ufffd")
        elif len(window) <= len(before) or window.endswith("\ufffd"):
            return
        start = len(self.text)
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(ids)
        # The stop string that ends first ends the text (one may begin in text consumed before).
        ends = []
        for stop in self._stops:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0:
                ends.append((at + len(stop), at))
        if ends:
            self.text = self.text[: min(ends)[1]]
            self._stopped = True

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta


def emit(on_text: OnText, text: str, result: GenerationResult, reported: int) -> int:
    """Pass `text` and the log-probabilities of the result's tokens after the first `reported` (when
    they are recorded) to `on_text`; returns how many tokens are reported now."""
    tokens = result.logprob_entries(reported)
    if text or tokens:
        on_text(text, tokens)
    return len(result.token_ids)
