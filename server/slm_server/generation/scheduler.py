"""Continuous batching: the sequences being generated share forward passes of one model (a
`BatchableModel`; `TransformersEngine` is the one the server serves).

One scheduler thread owns the model's generation passes. A request's worker thread hands its
sequence over (`Scheduler.run`) and waits; the scheduler, between two decode steps, prefills the
sequences that arrived (together, left-padded), samples their first token, and adds them to the
running batch, so the next decode step feeds every running sequence's last token in one forward
pass. A sequence that ends (end of sequence, stop string, max_tokens, cancel) leaves the batch at
once; its worker thread returns. That is continuous batching (Orca, OSDI '22; TGI's and vLLM's
schedulers) on the model's own KV cache, without paged attention: the batch's cache is left-padded
to its longest sequence, each sequence's positions are its own (`position_ids`), and the attention
mask hides the padding. A long prefill is fed in chunks (`prefill_chunk_tokens` per pass, shared by
the prompts prefilled together), each followed by a decode step of the running batch, so a long
prompt delays the running generations' next token by one chunk's pass, not its whole prefill
(chunked prefill, as vLLM and TGI do it, but in a pass of its own: `bench/bench_prefill.py`).

Why: a decode step costs nearly the same for one sequence as for eight (on a GPU the weights are
read once per pass either way; on a CPU a small model's pass is mostly fixed per-call cost), so
eight streams share one pass's cost instead of paying for eight. `bench/bench_batching.py` measures
it against one sequence per pass.

Everything per sequence stays per sequence: sampling settings, seed (its own generator), penalties,
stop strings, log-probabilities, the timestamps and text deltas the monitoring reads, and the
perplexity summed from the chosen tokens' log-probabilities in the same pass.

The padded cache needs a cache whose layers are plain tensors that can be padded, concatenated and
sliced (transformers' `DynamicCache` of `DynamicLayer`s, or of `DynamicSlidingWindowLayer`s for
sliding-window attention: GPT-2, Llama, Qwen2, Phi-3, Mistral and most others), and a model that
takes `attention_mask` and `position_ids`. Any other model (a quantized or offloaded cache, an older
transformers) runs one sequence per pass, in turn, on the same scheduler (`Scheduler.batching` says
which, and the `model_loaded` event logs it).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from slm_server.generation.detokenize import TextTracker, emit
from slm_server.generation.prefix_cache import PrefixCache
from slm_server.generation.sampling import choose_token, top_alternatives
from slm_server.generation.types import Alternative, BatchStats, GenerationResult, KVCacheStats, OnText, SamplingParams

log = logging.getLogger("slm_server.engine")

# How long a pass's generations wait for a grammar's mask that is not ready when the pass ends; a
# generation whose mask comes later steps aside from its batch and rejoins once the mask is there.
MASK_WAIT_SECONDS = 0.05


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # (rows, positions, vocabulary); the last position's at least
    cache: Any  # the model's KV cache after the pass (transformers' DynamicCache for a batchable model)


class BatchableModel(Protocol):
    """What the scheduler needs of a loaded causal LM."""

    device: torch.device
    eos_ids: frozenset[int]
    vocab_size: int  # the width of its logits

    @property
    def max_context(self) -> int: ...

    @property
    def takes_padding(self) -> bool:
        """Whether its forward pass takes `attention_mask` and `position_ids` (left-padded batches)."""
        ...

    def forward(self, input_ids: torch.Tensor, cache: Any, **inputs: torch.Tensor) -> ForwardOutput:
        """One pass over `input_ids` (tensors on any device) after `cache` (None: none yet); `inputs`
        are the attention mask and positions of a padded batch. The logits of the last position are
        enough."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class PassFailed(RuntimeError):
    """The forward pass a generation was part of raised (the model's exception is the cause)."""


class GenerationSequence:
    """One generation's state between decode steps: what it feeds next and what it has made."""

    __slots__ = (
        "bias", "cached", "cancel", "context", "counts", "cut", "done", "eos", "error", "generator", "grammar",
        "greedy", "held", "last", "mask", "max_tokens", "on_text", "params", "reported", "result", "seen", "tracker",
        "whole",
    )  # fmt: skip

    def __init__(self, model: BatchableModel, prompt_ids: list[int], params: SamplingParams,
                 on_text: OnText | None, cancel: threading.Event | None):  # fmt: skip
        # An empty prompt starts from end-of-text, as GPT-2 was trained to.
        self.context = prompt_ids or [next(iter(model.eos_ids), 0)]
        self.max_tokens = max(0, min(params.max_tokens, model.max_context - len(self.context)))
        self.params = params
        self.on_text = on_text
        self.cancel = cancel
        self.generator = torch.Generator(device=model.device)
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed() & 0xFFFF_FFFF)
        self.result = GenerationResult(token_ids=[], text="", finish_reason="length", prompt_tokens=len(prompt_ids))
        if params.logprobs is not None:
            self.result.token_logprobs, self.result.top_logprobs = [], []
        self.tracker = TextTracker(model.decode, params.stop)
        self.reported = 0  # tokens whose log-probabilities went out with a piece of text
        # What the choice changes in the logits, when the request asks (each a vocabulary-sized vector):
        # occurrences in the output (presence and frequency penalties), tokens of the prompt and the
        # output (repetition penalty), and the request's biases.
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(model.vocab_size, device=model.device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
            self.seen[torch.tensor(self.context, device=model.device)] = True
        if params.logit_bias:
            self.bias = torch.zeros(model.vocab_size, device=model.device)
            tokens, biases = zip(*params.logit_bias, strict=True)
            self.bias[torch.tensor(tokens, device=model.device)] = torch.tensor(biases, device=model.device)
        self.grammar = params.grammar.start() if params.grammar is not None else None  # structured output
        # The grammar's mask of the next token, computed in the scheduler's grammar threads while the
        # model's pass runs (`Scheduler._next_mask`); and the logits of a generation that stepped aside
        # from its batch to wait for it (`Scheduler._step_aside`).
        self.mask: Future[np.ndarray] | None = None
        self.held: torch.Tensor | None = None
        self.whole = False  # the grammar's document is complete
        self.cut = False  # a stop string ended the text
        # min_tokens: the end-of-text ids, kept from the choice until the output is that long.
        self.eos = torch.tensor(sorted(model.eos_ids), device=model.device) if params.min_tokens else None
        adjusted = any(x is not None for x in (self.counts, self.seen, self.bias, self.grammar, self.eos))
        # The batch's argmax is this sequence's choice: nothing adjusted, no sampling, no fault.
        self.greedy = params.temperature <= 1e-5 and not adjusted and not params.degraded
        self.cached = 0  # this sequence's tokens in its batch's KV cache
        self.last = -1  # the token to feed next
        self.done = threading.Event()
        self.error: BaseException | None = None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token; the penalties, biases and grammar change the choice, not the logits the
        reported log-probabilities (and the perplexity) come from."""
        params = self.params
        seen, counts = self.seen, self.counts
        if seen is not None:
            penalty = params.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if counts is not None:
            logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
        if self.bias is not None:
            logits = logits + self.bias
        eos = self.eos
        if eos is not None and len(self.result.token_ids) < params.min_tokens:
            logits = logits.index_fill(0, eos, float("-inf"))
        grammar = self.grammar
        if grammar is not None:
            mask, self.mask = self.mask, None
            refused = grammar.refused(logits.shape[-1]) if mask is None else mask.result()
            logits = logits.masked_fill(torch.from_numpy(refused).to(logits.device), float("-inf"))
        token = choose_token(logits, params, self.generator)
        if grammar is not None:
            self.whole = grammar.advance(token)
        if counts is not None:
            counts[token] += 1
        if seen is not None:
            seen[token] = True
        return token

    def accept(self, token: int, logprob: float, top: list[Alternative] | None, now: float,
               eos_ids: frozenset[int]) -> bool:  # fmt: skip
        """Record a generated token; True when the generation has ended with it."""
        result = self.result
        result.logprob_sum += logprob
        if top is not None and result.token_logprobs is not None and result.top_logprobs is not None:
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(top)
        result.token_times.append(now)
        result.token_ids.append(token)
        if token in eos_ids and not self.params.ignore_eos:
            result.finish_reason = "stop"
            return True
        delta, stopped = self.tracker.update(result.token_ids)
        if delta and self.on_text is not None:
            self.reported = emit(self.on_text, delta, result, self.reported)
        if stopped or self.whole:
            result.finish_reason = "stop"
            self.cut = stopped  # a stop string cuts the text, whatever the grammar took
            return True
        self.last = token
        return len(result.token_ids) >= self.max_tokens

    def finish(self, error: BaseException | None = None) -> None:
        """End the generation: its last text out, its waiting thread woken."""
        if error is None:
            try:
                tail = self.tracker.finish(self.result.token_ids)
                if self.on_text is not None:
                    emit(self.on_text, tail, self.result, self.reported)
                self.result.text = self.tracker.text.rstrip("\ufffd")
                if self.grammar is not None:
                    # Cut (cancelled) while its next mask is computed: the matcher is busy, and the
                    # output counts as incomplete.
                    busy = self.mask is not None and not self.mask.done()
                    self.result.structured_complete = not busy and self.grammar.complete() and not self.cut
            except Exception as exc:  # a failing callback fails this generation only
                error = exc
        self.error = error
        self.done.set()


class PromptColumns(NamedTuple):
    """The prompt columns of a batch not fed yet, each (rows, columns left)."""

    ids: torch.Tensor
    mask: torch.Tensor | None  # 1 where a row has a token; None without padding support
    positions: torch.Tensor | None  # each token's position in its own sequence; None without padding support

    def columns(self, first: int, last: int | None = None) -> PromptColumns:
        return PromptColumns(*(None if t is None else t[:, first:last] for t in self))  # type: ignore[arg-type]

    def rows(self, keep: torch.Tensor) -> PromptColumns:
        return PromptColumns(*(None if t is None else t.index_select(0, keep) for t in self))  # type: ignore[arg-type]


class _Batch:
    """Sequences that share one KV cache, left-padded to the longest; `mask` marks real positions.
    While it is being prefilled, `prompt` holds the prompt columns not yet fed."""

    __slots__ = ("cache", "mask", "prompt", "rows")

    def __init__(self, rows: list[GenerationSequence], prompt: PromptColumns | None):
        self.rows = rows
        self.cache: Any = None
        # (rows, cached length), 1 where a row has a token; None without padding support
        self.mask: torch.Tensor | None = None
        self.prompt: PromptColumns | None = prompt


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Scheduler:
    """The generation loop of one model (see the module's doc)."""

    def __init__(
        self,
        model: BatchableModel,
        max_batch_size: int,
        batching: bool,
        prefill_chunk_tokens: int = 0,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.batching = batching and self.max_batch_size > 1
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: a whole prompt in one pass
        # Prompt prefixes' KV caches (slm_server.generation.prefix_cache); only on a padded batch's cache.
        self.prefix_cache = prefix_cache if self.batching else None
        self.forward_passes = 0  # decode steps and prefills, for the mean batch size
        self.generations_fed = 0  # sequences fed in them
        self._inbox: list[GenerationSequence] = []
        self._batches: list[_Batch] = []  # decoding: one when batching, else one per sequence
        self._prefilling: list[_Batch] = []  # arrived, their prompts fed a chunk per loop, in turn
        self._aside: list[_Batch] = []  # waiting for their grammar's mask, each in a batch of its own
        # Grammar masks are computed here, beside the model's passes (llguidance releases the GIL).
        self._grammars = ThreadPoolExecutor(
            max_workers=max(1, min(self.max_batch_size, os.cpu_count() or 1)), thread_name_prefix="slm-grammar"
        )
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="slm-scheduler", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Generations in the running batch (being decoded), or waiting beside it for their grammar's mask."""
        return sum(len(b.rows) for b in list(self._batches) + list(self._aside))  # copies: read from other threads

    @property
    def waiting(self) -> int:
        """Generations handed over and not taken yet (they arrived during the loop's current round, or
        wait for room in the batch)."""
        return len(self._inbox)

    @property
    def prefilling(self) -> int:
        """Generations whose prompts are being fed (chunked prefill)."""
        return sum(len(b.rows) for b in list(self._prefilling))

    def batch_stats(self) -> BatchStats:
        return BatchStats(self.running, self.forward_passes, self.generations_fed)

    def kv_cache_stats(self) -> KVCacheStats:
        """The KV cache of the generations running and being prefilled (its bytes are the tensors'
        size: a cache trimmed a moment ago may hold more until its next step), read from other
        threads: the lists are copied, and a tensor replaced meanwhile is read as it was."""
        held = positions = padding = 0
        for batch in list(self._batches) + list(self._prefilling) + list(self._aside):
            cache, mask = batch.cache, batch.mask
            if cache is None:
                continue
            held += sum(layer.keys.nbytes + layer.values.nbytes for layer in list(cache.layers))
            if mask is not None:  # a padded batch: its mask says which positions are real
                positions += mask.numel()
                padding += mask.numel() - int(mask.sum())
            else:  # one sequence, no padding
                positions += int(cache.get_seq_length())
        return KVCacheStats(held, positions, padding)

    def run(
        self, prompt_ids: list[int], params: SamplingParams, on_text: OnText | None, cancel: threading.Event | None
    ) -> GenerationResult:
        """Generate to the end (blocks the calling thread); raises what failed the generation. A
        cancel is seen at the loop's next step, whether the generation runs or waits for a place."""
        sequence = GenerationSequence(self.model, prompt_ids, params, on_text, cancel)
        if sequence.max_tokens == 0:  # the prompt fills the context: nothing to generate
            sequence.finish()
        else:
            self._next_mask(sequence)  # its first token's, while it waits and its prompt is fed
            with self._wake:
                if self._closed:
                    raise RuntimeError("the model is closed")
                self._inbox.append(sequence)
                self._wake.notify()
            sequence.done.wait()
        if sequence.error is not None:
            raise sequence.error
        return sequence.result

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._grammars.shutdown(wait=False, cancel_futures=True)

    # --- the scheduler thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._batches or self._prefilling or self._closed or self._rejoining()):
                    self._wake.wait()  # a generation aside wakes it once its mask is there (`_step_aside`)
                if self._closed:
                    closed = RuntimeError("the model was closed during the generation")
                    for sequence in self._inbox + self._all_rows():
                        sequence.finish(closed)
                    self._inbox.clear()
                    self._batches.clear()
                    self._prefilling.clear()
                    self._aside.clear()
                    return
                waiting = self._drop_cancelled(self._inbox)  # timed out or gone while waiting for room
                fresh: list[GenerationSequence] = []
                if not self._prefilling:  # those that arrive meanwhile are prefilled together next
                    room = self.max_batch_size - self.running
                    fresh, waiting = waiting[:room], waiting[room:]
                self._inbox[:] = waiting
            try:
                with torch.inference_mode():
                    if fresh:
                        self._prefilling = self._prefill_batches(fresh)
                    if self._prefilling:
                        self._prefill_step(self._prefilling[0])
                    for batch in list(self._batches):
                        self._decode(batch)
                    if self._aside:
                        self._rejoin()
            except Exception as exc:  # a bug of this loop: fail what runs (its cache is suspect), go on serving
                log.exception("generation loop failed", extra={"fields": {"event": "error"}})
                for sequence in fresh + self._all_rows():
                    if not sequence.done.is_set():
                        sequence.finish(PassFailed(f"{type(exc).__name__}: {exc}"))
                self._batches.clear()
                self._prefilling.clear()
                self._aside.clear()

    def _all_rows(self) -> list[GenerationSequence]:
        return [s for b in self._prefilling + self._batches + self._aside for s in b.rows]

    # --- grammar masks ------------------------------------------------------------------------------
    # A generation held to a grammar (structured output) needs the grammar's mask before each token is
    # chosen. The mask of the next token is computed in a grammar thread as soon as the token before
    # is taken, so it is ready when the model's pass ends, as a rule. A grammar a client wrote may make
    # a mask cost far more than a pass (llguidance's per-token limits allow ~0.1 s): a generation whose
    # mask is not there MASK_WAIT_SECONDS after the pass steps aside, in a batch of its own with the
    # logits of its pass, and the others go on; once its mask is there, it takes its token and rejoins
    # the running batch. So one client's grammar never holds back the other generations' tokens.
    def _next_mask(self, s: GenerationSequence) -> None:
        if s.grammar is not None:
            s.mask = self._grammars.submit(s.grammar.refused, self.model.vocab_size)

    def _late(self, rows: list[GenerationSequence]) -> list[GenerationSequence]:
        """The rows whose mask is still being computed MASK_WAIT_SECONDS from now (or sooner, all ready)."""
        pending = [s.mask for s in rows if s.mask is not None and not s.mask.done()]
        if not pending:
            return []
        wait(pending, timeout=MASK_WAIT_SECONDS)
        return [s for s in rows if s.mask is not None and not s.mask.done()]

    def _step_aside(self, batch: _Batch, late: list[GenerationSequence], logits: torch.Tensor) -> torch.Tensor | None:
        """Move the `late` rows out of `batch`, each with its row of `logits` and a batch of its own
        (its cache rows); returns the logits of the rows that stay, None when none does."""
        staying = [i for i, s in enumerate(batch.rows) if s not in late]
        for i, s in enumerate(batch.rows):
            if s in late:
                s.held = logits[i].clone()
        if batch.mask is None:  # one sequence per batch (no padding): the batch itself steps aside
            for batches in (self._batches, self._prefilling):
                if batch in batches:
                    batches.remove(batch)
            self._aside.append(batch)
        else:
            for s in late:
                self._aside.append(self._split(batch, s))
            self._keep(batch, [batch.rows[i] for i in staying])
        for s in late:
            assert s.mask is not None
            s.mask.add_done_callback(self._poke)
        if not staying or batch.mask is None:
            return None
        return logits[torch.tensor(staying, dtype=torch.long, device=logits.device)]

    def _split(self, batch: _Batch, s: GenerationSequence) -> _Batch:
        """A batch of `s` alone: its rows of `batch`'s cache (copies), the padding no longer needed dropped."""
        part = _Batch(list(batch.rows), None)
        part.mask = batch.mask
        cache = copy.copy(batch.cache)
        cache.layers = [copy.copy(layer) for layer in batch.cache.layers]  # `_keep` replaces their tensors
        part.cache = cache
        self._keep(part, [s])
        return part

    def _poke(self, _: object = None) -> None:
        with self._wake:
            self._wake.notify()

    def _rejoining(self) -> bool:
        """Whether a generation aside can go on: its mask is there."""
        return any(s.mask is None or s.mask.done() for batch in self._aside for s in batch.rows)

    def _rejoin(self) -> None:
        """The generations aside whose mask is there take their token and rejoin the running batch (or
        end there, cancelled meanwhile: nobody waits for them, their client has gone or had its 504)."""
        for batch in list(self._aside):
            (s,) = batch.rows
            if s.mask is not None and not s.mask.done():
                continue
            self._aside.remove(batch)
            if s.cancel is not None and s.cancel.is_set():
                s.result.finish_reason = "abort"
                s.finish()
                continue
            held, s.held = s.held, None
            assert held is not None
            if self._take_tokens(batch, held[None]):
                self._merge(batch)

    def _prefill_batches(self, fresh: list[GenerationSequence]) -> list[_Batch]:
        """The arrivals as batches to prefill: one per sequence without batching; with it, one per
        sequence whose prompt begins with a cached prefix (its cache starts as a copy of the
        prefix's, and only the rest of its prompt is fed; first, as it is the shortest work), then
        one for the others, left-padded to the longest prompt."""
        if not self.batching:
            return [_Batch([s], PromptColumns(torch.tensor([s.context]), None, None)) for s in fresh]
        batches, others = [], []
        for s in fresh:
            batch = self._from_cached_prefix(s) if self.prefix_cache is not None else None
            if batch is None:
                others.append(s)
            else:
                batches.append(batch)
        if others:
            longest = max(len(s.context) for s in others)
            ids = torch.tensor([[0] * (longest - len(s.context)) + s.context for s in others])
            mask = torch.tensor([[0] * (longest - len(s.context)) + [1] * len(s.context) for s in others])
            batches.append(_Batch(others, PromptColumns(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))))
        return batches

    def _prefill_step(self, batch: _Batch) -> None:
        """Feed the batch's next prompt chunk (chunked prefill: at most prefill_chunk_tokens tokens,
        padding included, so the running generations wait one chunk's pass for their next token, not
        a whole long prompt's); after the last, its first tokens, and it joins the running batch."""
        rows = self._drop_cancelled(batch.rows)
        if len(rows) < len(batch.rows):
            self._keep(batch, rows)
            if not rows:
                return
        assert batch.prompt is not None
        prompt = batch.prompt
        width = prompt.ids.shape[1]
        if self.prefill_chunk_tokens:
            width = min(width, max(1, self.prefill_chunk_tokens // len(rows)))
        chunk = prompt.columns(0, width)
        inputs: dict[str, torch.Tensor] = {}
        if chunk.mask is not None and chunk.positions is not None:
            batch.mask = chunk.mask if batch.mask is None else torch.cat([batch.mask, chunk.mask], dim=1)
            inputs = {"attention_mask": batch.mask, "position_ids": chunk.positions}
        last = width == prompt.ids.shape[1]
        batch.prompt = None if last else prompt.columns(width)
        if not last:
            self._pass(batch, chunk.ids, inputs)  # a failure ends its rows and drops the batch
            return
        self._prefilling.remove(batch)
        for s in rows:
            s.cached = len(s.context)
        out = self._pass(batch, chunk.ids, inputs)
        if out is None:
            return
        if self.prefix_cache is not None:
            self._remember_prefixes(batch)
        if self._take_tokens(batch, out.logits[:, -1]):
            self._merge(batch)

    def _from_cached_prefix(self, s: GenerationSequence) -> _Batch | None:
        """A batch of `s` alone whose cache starts as a copy of its prompt's cached prefix, the rest
        of its prompt to feed; None when no prefix is cached, or the copy failed (out of memory:
        the prompt is then prefilled whole, as on a miss)."""
        assert self.prefix_cache is not None
        try:
            found, layers = self.prefix_cache.lookup(s.context)
            if not found:
                return None
            cache = _cache_of(layers)
        except Exception:
            log.warning("a prefix cache hit could not be copied: prefilled whole", exc_info=True)
            return None
        s.result.cached_tokens = found
        rest = len(s.context) - found
        mask = torch.ones((1, rest), dtype=torch.long)
        prompt = PromptColumns(torch.tensor([s.context[found:]]), mask, torch.arange(found, found + rest)[None])
        batch = _Batch([s], prompt)
        batch.cache = cache
        batch.mask = torch.ones((1, found), dtype=torch.long)
        return batch

    def _remember_prefixes(self, batch: _Batch) -> None:
        """Keep each prompt's prefix cache (its row of the batch's cache, where its tokens are the
        last of the left-padded columns). A prefix that cannot be kept (out of memory) is left out:
        the generations go on."""
        assert self.prefix_cache is not None and batch.mask is not None
        width, cache_layers = batch.mask.shape[1], batch.cache.layers
        for i, s in enumerate(batch.rows):
            start = width - len(s.context)
            layers = [(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache_layers]
            try:
                self.prefix_cache.insert(s.context, layers)
            except Exception:
                log.warning("a prompt prefix could not be kept in the prefix cache", exc_info=True)
                return

    def _decode(self, batch: _Batch) -> None:
        rows = self._drop_cancelled(batch.rows)
        if len(rows) < len(batch.rows):
            self._keep(batch, rows)
            if not rows:
                return
        ids = torch.tensor([[s.last] for s in rows])
        inputs: dict[str, torch.Tensor] = {}
        if batch.mask is not None:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
            inputs = {"attention_mask": batch.mask, "position_ids": torch.tensor([[s.cached] for s in rows])}
        for s in rows:
            s.cached += 1
        self._forward(batch, ids, inputs)

    def _pass(self, batch: _Batch, ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> ForwardOutput | None:
        """One forward pass over the batch, its cache kept; the model's output, or None when the pass
        failed (each of its generations then fails with the model's error as the cause)."""
        try:
            out = self.model.forward(ids, batch.cache, **inputs)
        except Exception as exc:  # the model failed: every sequence of this pass fails (500), the loop goes on
            for s in batch.rows:  # each its own error (raised in its own thread), the model's as the cause
                failed = PassFailed(f"{type(exc).__name__}: {exc}")
                failed.__cause__ = exc
                s.finish(failed)
            self._keep(batch, [])
            return None
        self.forward_passes += 1
        self.generations_fed += len(batch.rows)
        batch.cache = out.cache
        return out

    def _forward(self, batch: _Batch, ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> bool:
        """One pass over the batch and a token for each of its rows; the finished rows leave it.
        False when the batch is gone (all its rows ended, or the pass failed them all)."""
        out = self._pass(batch, ids, inputs)
        return out is not None and self._take_tokens(batch, out.logits[:, -1])

    def _take_tokens(self, batch: _Batch, last_logits: torch.Tensor) -> bool:
        """A token for each row of the batch from the logits of its last position, (rows, vocabulary);
        the finished rows leave it, and so do, for now, those whose grammar's mask is late (they step
        aside). False when the batch is gone."""
        eos_ids = self.model.eos_ids
        logits = last_logits.float()
        late = self._late(batch.rows)
        if late:
            staying = self._step_aside(batch, late, logits)
            if staying is None:
                return False
            logits = staying
        rows = batch.rows
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1).tolist() if any(s.greedy for s in rows) else []
        tokens: list[int] = []
        unchosen: dict[int, Exception] = {}
        for i, s in enumerate(rows):
            try:
                tokens.append(greedy[i] if s.greedy else s.choose(logits[i]))
            except Exception as exc:  # e.g. NaN logits that no token can be sampled from: this generation fails
                tokens.append(0)
                unchosen[i] = exc
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
        now = time.perf_counter()
        going: list[GenerationSequence] = []
        for i, s in enumerate(rows):
            try:
                if i in unchosen:
                    raise unchosen[i]
                top = top_alternatives(logprobs[i], s.params.logprobs) if s.params.logprobs is not None else None
                ended = s.accept(tokens[i], chosen[i], top, now, eos_ids)
            except Exception as exc:  # a failing choice, callback or decode fails this generation only
                s.finish(exc)
                continue
            if ended:
                s.finish()
            else:
                going.append(s)
                self._next_mask(s)
        if len(going) < len(rows):
            self._keep(batch, going)
        return bool(going)

    def _drop_cancelled(self, rows: list[GenerationSequence]) -> list[GenerationSequence]:
        going = []
        for s in rows:
            if s.cancel is not None and s.cancel.is_set():
                s.result.finish_reason = "abort"
                s.finish()
            else:
                going.append(s)
        return going

    def _keep(self, batch: _Batch, rows: Sequence[GenerationSequence]) -> None:
        """Keep only `rows` of the batch (their cache rows, and their prompt columns not yet fed),
        and drop the padding no row needs (once the prompts are all in: until then the columns stay,
        so that the prompt's next columns follow them)."""
        if not rows:
            for batches in (self._batches, self._prefilling):
                if batch in batches:
                    batches.remove(batch)
            batch.rows = []
            batch.cache = None
            return
        index = [batch.rows.index(s) for s in rows]
        batch.rows = list(rows)
        keep = torch.tensor(index)
        if batch.prompt is not None and batch.prompt.mask is not None:
            batch.prompt = batch.prompt.rows(keep)
        if batch.cache is None or batch.mask is None:
            return
        mask = batch.mask.index_select(0, keep)
        first = 0 if batch.prompt is not None else int(mask.any(dim=0).nonzero()[0])  # padding in every row before
        batch.mask = mask[:, first:]
        length = batch.mask.shape[1]
        layer_keep = keep.to(self.model.device)
        for layer in batch.cache.layers:
            held = _held(layer, length)  # the last positions of the cache that the layer holds
            layer.keys = layer.keys.index_select(0, layer_keep)[..., layer.keys.shape[-2] - held :, :]
            layer.values = layer.values.index_select(0, layer_keep)[..., layer.values.shape[-2] - held :, :]
            _set_length(layer, length)

    def _merge(self, fresh: _Batch) -> None:
        """Add a prefilled batch to the running one (batching), or run it beside the others."""
        if not self.batching or not self._batches:
            self._batches.append(fresh)
            return
        running = self._batches[0]
        assert running.mask is not None and fresh.mask is not None  # batching: padded batches
        length = max(running.mask.shape[1], fresh.mask.shape[1])
        running.mask = torch.cat([_pad_left(running.mask, length, 1), _pad_left(fresh.mask, length, 1)], dim=0)
        for layer, new in zip(running.cache.layers, fresh.cache.layers, strict=True):
            held = _held(layer, length)
            layer.keys = torch.cat([_pad_left(layer.keys, held, -2), _pad_left(new.keys, held, -2)])
            layer.values = torch.cat([_pad_left(layer.values, held, -2), _pad_left(new.values, held, -2)])
            _set_length(layer, length)
        running.rows = running.rows + fresh.rows


# The cache of a batch is `length` positions long (its attention mask's width); a layer holds the last
# `_held(layer, length)` of them: all, or for a sliding-window layer the window's last but one (what
# its next step can see, as `DynamicSlidingWindowLayer.update` keeps). Padding positions of a row are
# zeros in the tensors and 0 in the mask. In padded coordinates a row's distances between positions
# are its own, so the window's mask is right for every row.
def _held(layer: Any, length: int) -> int:
    return min(length, layer.sliding_window - 1) if layer.is_sliding else length


def _set_length(layer: Any, length: int) -> None:
    if layer.is_sliding:
        layer.cumulative_length = length  # what its mask sizes are computed from


def _cache_of(layers: list[tuple[Any, Any]]) -> Any:
    """A model cache holding copies of `layers`' (keys, values)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def cache_support(model: BatchableModel) -> tuple[bool, bool]:
    """(batching, prefix caching) for the model, from one test pass over one token that shows the
    cache it makes. Batching: the model takes a left-padded batch on a cache this module can pad,
    join and slice. Prefix caching: besides, every layer of that cache keeps its whole past (plain
    `DynamicLayer`s), which any shorter prefix can be cut from; not a sliding-window layer (Phi-3,
    Mistral, Gemma)."""
    if not model.takes_padding:
        return False, False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # an older transformers: its cache keeps its tensors in other places
        return False, False
    try:
        with torch.inference_mode():
            ids = torch.tensor([[next(iter(model.eos_ids), 0)]])
            cache = model.forward(ids, None, attention_mask=torch.ones_like(ids)).cache
    except Exception:  # a model that refuses the test pass is served one sequence per pass
        log.warning("the model failed a test pass with an attention mask: one sequence per pass", exc_info=True)
        return False, False
    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return False, False
    plain = [type(layer) is DynamicLayer for layer in cache.layers]
    batching = all(
        is_plain or (type(layer) is DynamicSlidingWindowLayer and not layer.record_past)
        for is_plain, layer in zip(plain, cache.layers, strict=True)
    )
    return batching, batching and all(plain)
