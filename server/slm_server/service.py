"""The serving logic between the routers and the engine.

Admission (a bounded number of generations at once, a bounded queue, 429 beyond it), deadlines
(queue + generation; 504 after), running blocking generation in worker threads that can be
stopped between tokens, streaming, fault injection, and — once per generation — the metrics, the
request's log fields and the drift signals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slm_server.engine import Engine, GenerationResult, OnText, SamplingParams, TokenLogprobs
from slm_server.errors import (
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    ServerError,
)
from slm_server.logs import OutputLogPolicy
from slm_server.metrics import NullMetrics, ServerMetrics
from slm_server.protocol import ChoiceConstraint, JsonConstraint, RegexConstraint
from slm_server.settings import Settings
from slm_server.signals import NoopObserver, RequestSignals, SignalObserver, is_repetitive

if TYPE_CHECKING:
    from slm_server.structured import OutputGrammar

log = logging.getLogger("slm_server.service")

# What a stream yields: (text delta, the log-probabilities of its tokens, None), then ("", [], result).
StreamEvent = tuple[str, list[TokenLogprobs], GenerationResult | None]
# The same, of one of a request's choices: its index first.
ChoiceEvent = tuple[int, str, list[TokenLogprobs], GenerationResult | None]


# What a generation's end leaves in its request's record for the log line: atoms only, so a line
# waiting in the log writer's batch keeps nothing else alive (no job, result, or token list; many
# objects kept per request cost the garbage collector and the CPU caches more than the line).
# (error type, finish reason, output tokens, queue seconds, time to first token, seconds from the
#  first token to the last, gaps between tokens, sum of the tokens' log p, output text, prompt tokens
#  found in the prefix cache)
Outcome = tuple[str | None, str | None, int, float | None, float | None, float, int, float, str | None, int]


class RequestRecord:
    """What one HTTP request learned, for its log line. Made by the middleware, filled by the service.

    The service leaves the request's parameters here and, as each of its generations (one per
    choice) ends, an `Outcome`; `add_log_fields()` turns them into the line's fields later, off the
    request path (slm_server.logs.JsonLines' flusher).
    """

    __slots__ = ("model", "outcomes", "policy", "request", "request_id", "start", "trace_id")

    def __init__(self, request_id: str, start: float, trace_id: str | None = None):
        self.request_id = request_id
        self.start = start  # perf_counter() at arrival
        self.trace_id = trace_id
        # (operation, the request's SamplingParams, prompt tokens, stream) once a job is made
        self.request: tuple[str, SamplingParams, int, bool] | None = None
        self.outcomes: list[Outcome | None] = []  # per choice, once its generation ended
        self.model = ""
        self.policy: OutputLogPolicy | None = None

    def add_log_fields(self, fields: dict[str, Any]) -> None:
        """The request's GenAI fields, into its line's `fields`. With one choice, its fields are the
        line's own; with n > 1 the line has totals over the choices and `slm.choices`, one such set
        of fields per choice."""
        request = self.request
        if request is None:
            return
        operation, params, prompt_tokens, stream = request
        fields["gen_ai.operation.name"] = operation
        fields["gen_ai.request.model"] = self.model
        fields["gen_ai.request.max_tokens"] = params.max_tokens
        fields["gen_ai.request.temperature"] = params.temperature
        fields["gen_ai.request.top_p"] = params.top_p
        if params.top_k:
            fields["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            fields["gen_ai.request.seed"] = params.seed
        if params.presence_penalty:
            fields["gen_ai.request.presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            fields["gen_ai.request.frequency_penalty"] = params.frequency_penalty
        if params.grammar is not None:
            fields["gen_ai.output.type"] = params.grammar.output_type
        fields["gen_ai.usage.input_tokens"] = prompt_tokens
        fields["slm.stream"] = stream
        outcomes, policy = self.outcomes, self.policy
        if len(outcomes) == 1:
            outcome = outcomes[0]
            if outcome is not None:
                text = outcome[8]
                _outcome_fields(
                    fields, outcome, self.model, policy.fields(text) if policy and text is not None else None
                )
            return
        sampled = policy is not None and policy.sampled()
        choices = []
        for index, outcome in enumerate(outcomes):
            choice: dict[str, Any] = {"slm.choice.index": index}
            if outcome is not None:
                text = outcome[8]
                output = policy.describe(text) if sampled and text is not None else None  # type: ignore[union-attr]
                _outcome_fields(choice, outcome, self.model, output)
            choices.append(choice)
        fields["gen_ai.request.choice.count"] = len(outcomes)
        _totals(fields, [o for o in outcomes if o is not None], self.model)
        fields["slm.choices"] = choices


def _outcome_fields(fields: dict[str, Any], outcome: Outcome, model: str, output: dict[str, Any] | None) -> None:
    """The fields of one generation, into `fields`."""
    error_type, finish_reason, output_tokens, queue_seconds, ttft, span, gaps, logprob_sum, _, cached = outcome
    if error_type is not None:
        fields["error.type"] = error_type
    if finish_reason is None:
        return
    fields["gen_ai.response.model"] = model
    fields["gen_ai.usage.output_tokens"] = output_tokens
    fields["gen_ai.usage.cache_read.input_tokens"] = cached
    fields["gen_ai.response.finish_reasons"] = [finish_reason]
    fields["slm.queue_time_s"] = queue_seconds
    if ttft is not None:
        fields["gen_ai.server.time_to_first_token"] = ttft
        if gaps:
            fields["gen_ai.server.time_per_output_token"] = span / gaps
    fields["slm.perplexity"] = math.exp(-logprob_sum / output_tokens) if output_tokens else None
    if output:
        fields.update(output)


def _totals(fields: dict[str, Any], outcomes: list[Outcome], model: str) -> None:
    """The fields of a request of several choices, over all of them, into `fields`."""
    errors = [o[0] for o in outcomes if o[0] is not None]
    if errors:
        fields["error.type"] = errors[0]
    ended = [o for o in outcomes if o[1] is not None]
    if not ended:
        return
    tokens = sum(o[2] for o in ended)
    waits = [o[3] for o in ended if o[3] is not None]
    firsts = [o[4] for o in ended if o[4] is not None]
    gaps = sum(o[6] for o in ended)
    fields["gen_ai.response.model"] = model
    fields["gen_ai.usage.output_tokens"] = tokens
    fields["gen_ai.response.finish_reasons"] = [o[1] for o in ended]
    fields["slm.queue_time_s"] = max(waits) if waits else None
    if firsts:
        fields["gen_ai.server.time_to_first_token"] = min(firsts)
    if gaps:
        fields["gen_ai.server.time_per_output_token"] = sum(o[5] for o in ended) / gaps
    # The perplexity of all the generated tokens together: exp of their mean negative log-likelihood.
    fields["slm.perplexity"] = math.exp(-sum(o[7] for o in ended) / tokens) if tokens else None


@dataclass
class Faults:
    """Fault injection, mutable at run time only through the opt-in admin API."""

    enabled: bool = False
    error_rate: float = 0.0
    latency_seconds: float = 0.0
    degraded_rate: float = 0.0

    @classmethod
    def from_settings(cls, s: Settings) -> Faults:
        return cls(s.fault_injection, s.fault_error_rate, s.fault_latency_seconds, s.fault_degraded_rate)


class InjectedFault(RuntimeError):
    """A failure made on purpose by fault injection."""


@dataclass
class Job:
    """One generation: a request's only one, or one of its n choices."""

    endpoint: str
    operation: str  # gen_ai.operation.name: text_completion | chat
    prompt_ids: list[int]
    params: SamplingParams
    # The request's id and arrival (perf_counter), not its RequestRecord: the record holds its jobs,
    # and a reference back would make each request a cycle that only the garbage collector frees.
    request_id: str
    start: float
    stream: bool = False
    index: int = 0  # the choice's index in the response
    deadline: float = 0.0
    queue_seconds: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    finished: bool = False
    outcomes: list[Outcome | None] = field(default_factory=list)  # the request record's: where its end goes


class Admission:
    """At most `limit` generations at once; at most `queue_limit` waiting; the rest refused at once."""

    def __init__(self, limit: int, queue_limit: int):
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_flight = 0  # read by the slm_requests_in_flight / _queued gauges when scraped
        self.queued = 0
        self._semaphore = asyncio.Semaphore(limit)
        self._idle = asyncio.Event()
        self._idle.set()
        self.recent_seconds = 1.0  # moving average of generation time, for Retry-After

    async def acquire(self, wait_seconds: float) -> float:
        """Wait for a slot; returns the time waited. Overloaded when the queue is full."""
        start = time.perf_counter()
        if self._semaphore.locked():
            if self.queued >= self.queue_limit:
                waits = math.ceil(self.recent_seconds * (self.queued + 1) / self.limit)
                raise Overloaded(
                    f"server overloaded: {self.in_flight} requests running and {self.queued} queued "
                    f"(limits {self.limit} and {self.queue_limit}); retry later",
                    headers={"Retry-After": str(max(1, waits))},
                )
            self.queued += 1
            try:
                await asyncio.wait_for(self._semaphore.acquire(), max(wait_seconds, 0.0))
            except TimeoutError:
                raise RequestTimeout(f"request timed out after {wait_seconds:.1f} s waiting in the queue") from None
            finally:
                self.queued -= 1
        else:
            await self._semaphore.acquire()
        self.in_flight += 1
        self._idle.clear()
        return time.perf_counter() - start

    def release(self, seconds: float | None = None) -> None:
        self.in_flight -= 1
        if seconds is not None:
            self.recent_seconds = 0.8 * self.recent_seconds + 0.2 * seconds
        self._semaphore.release()
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, within_seconds: float) -> bool:
        """Wait until nothing runs; False when `within_seconds` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_seconds)
            return True
        except TimeoutError:
            return False


def _counted(exc: ServerError) -> ServerError:
    """Mark an error the job accounting (`_finish`) counts, so the HTTP error handler does not."""
    exc.counted = True
    return exc


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: ServerMetrics | NullMetrics,
        signals: SignalObserver | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.signals = signals or NoopObserver()
        self.faults = Faults.from_settings(settings)
        self.output_policy = OutputLogPolicy(settings)
        self.model_name = settings.model_name
        self.ready = False
        self.load_error: str | None = None
        self.admission: Admission | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._random = random.Random()
        self._last_overload_log = 0.0

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop (called from the lifespan)."""
        admission = self.admission = Admission(self.settings.max_concurrent_requests, self.settings.max_queued_requests)
        self.metrics.watch_load(lambda: admission.in_flight, lambda: admission.queued)
        self.metrics.max_concurrent.set(self.settings.max_concurrent_requests)
        self.metrics.max_queued.set(self.settings.max_queued_requests)
        self.metrics.fault_injection.set(1 if self.faults.enabled else 0)
        if self.engine.blocking:
            self._executor = ThreadPoolExecutor(
                max_workers=self.settings.max_concurrent_requests, thread_name_prefix="slm-generate"
            )

    async def stop(self) -> None:
        self.ready = False
        if self.admission is not None:
            drained = await self.admission.drain(self.settings.drain_timeout_seconds)
            if not drained:
                log.warning(
                    "shutdown: generations still running after the drain timeout",
                    extra={"fields": {"event": "shutdown", "in_flight": self.admission.in_flight}},
                )
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- request checks -------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if not self.ready:
            raise ModelNotReady("the model is not loaded yet", headers={"Retry-After": "5"})

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise ModelNotFound(
                f"the model `{requested}` does not exist; this server serves `{self.model_name}`", param="model"
            )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token ids a request gives (a prompt, logit_bias) must be in the model's vocabulary: else 400."""
        vocab_size = self.engine.info.vocab_size
        outside = [token for token in ids if vocab_size and token >= vocab_size]
        if outside:
            raise InvalidInput(
                f"{param}: token id {outside[0]} is not in the model's vocabulary (ids 0 to {vocab_size - 1})",
                param=param,
            )

    async def sampling(self, body: Any) -> dict[str, Any]:
        """A request's sampling settings, as SamplingParams keywords: temperature, top_p and top_k
        from the model's defaults where the request leaves them out (a top_k of -1, vLLM's spelling,
        or 0 samples among all tokens), its penalties, min_p, logit biases (each id checked
        against the model's vocabulary: 400 naming it) and its response_format's grammar."""
        info = self.engine.info
        bias: tuple[tuple[int, float], ...] = ()
        if body.logit_bias:  # most requests give none: nothing to build on the request path
            bias = tuple((int(token), value) for token, value in body.logit_bias.items())
            self.check_token_ids([token for token, _ in bias], "logit_bias")
        grammar = None
        if body.response_format is not None or body.structured_outputs is not None:
            grammar = await self._requested_grammar(body.response_format, body.structured_outputs)
        return {
            "temperature": info.default_temperature if body.temperature is None else body.temperature,
            "top_p": info.default_top_p if body.top_p is None else body.top_p,
            "top_k": info.default_top_k if body.top_k is None else max(body.top_k, 0),
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty,
            "min_p": body.min_p,
            "logit_bias": bias,
            "grammar": grammar,
            "min_tokens": body.min_tokens,
            "ignore_eos": body.ignore_eos,
        }

    async def _requested_grammar(self, response_format: Any, structured: Any) -> OutputGrammar | None:
        """The grammar a request's response_format or structured_outputs asks for (at most one)."""
        if structured is not None:
            if response_format is not None and response_format.type != "text":
                raise InvalidInput(
                    "response_format and structured_outputs both say what the output must be: give one",
                    param="structured_outputs",
                )
            if isinstance(structured, JsonConstraint):
                return await self.output_grammar("json_schema", structured.json_schema, "structured_outputs.json")
            if isinstance(structured, RegexConstraint):
                return await self.output_grammar("regex", structured.regex, "structured_outputs.regex")
            if isinstance(structured, ChoiceConstraint):
                return await self.output_grammar("choice", structured.choice, "structured_outputs.choice")
            return await self.output_grammar("grammar", structured.grammar, "structured_outputs.grammar")
        if response_format.type == "json_schema":
            schema = response_format.json_schema.definition
            return await self.output_grammar("json_schema", schema, "response_format.json_schema.schema")
        if response_format.type == "json_object":
            return await self.output_grammar("json_object", None, "response_format")
        return None

    async def output_grammar(self, format: str, spec: Any, param: str) -> OutputGrammar:
        """The compiled grammar of `spec` (slm_server.structured.GrammarCompiler.compile; `param`: the
        request field it came from): from the compiler's cache, or compiled in a worker thread (a large
        schema takes long; the event loop goes on)."""
        grammars = self.engine.grammars
        if grammars is None:
            field = param.split(".")[0]
            raise InvalidInput(f"{field}: this model has no structured output (it needs a fast tokenizer)", param=field)
        key = grammars.key(format, spec)
        grammar = grammars.cached(key)
        if grammar is None:
            grammar = await asyncio.to_thread(grammars.compile, key, format, spec, param)
        return grammar

    def resolve_max_tokens(self, prompt_tokens: int, requested: int | None, param: str = "max_tokens") -> int:
        """Checks the prompt against the context and `max_tokens` against the cap; returns max_tokens."""
        context = self.engine.info.max_context
        cap = self.settings.max_new_tokens
        if prompt_tokens >= context:
            raise InvalidInput(
                f"the prompt is {prompt_tokens} tokens long; this model's context is {context} tokens "
                f"(the prompt must leave room for at least one generated token)",
                param="prompt",
            )
        if requested is None:
            return min(self.settings.default_max_tokens, cap, context - prompt_tokens)
        if requested > cap:
            raise InvalidInput(f"{param} is {requested}; the maximum is {cap}", param=param)
        if prompt_tokens + requested > context:
            raise InvalidInput(
                f"this model's context is {context} tokens; the prompt ({prompt_tokens} tokens) plus "
                f"{param} ({requested}) is {prompt_tokens + requested}",
                param=param,
            )
        return requested

    def check_choices(self, n: int) -> None:
        """All the choices of a request must be able to run at once."""
        limit = self.settings.max_concurrent_requests
        if n > limit:
            raise InvalidInput(
                f"n is {n}; this server runs at most {limit} generations at once (max_concurrent_requests)",
                param="n",
            )

    def new_jobs(
        self,
        n: int,
        *,
        endpoint: str,
        operation: str,
        prompt_ids: list[int],
        params: SamplingParams,
        record: RequestRecord,
        stream: bool = False,
    ) -> list[Job]:
        """One job per choice. With a seed, choice i samples with seed + i: the choices differ, and the
        same request gives the same choices again."""
        deadline = record.start + self.settings.request_timeout_seconds
        outcomes: list[Outcome | None] = [None] * n
        jobs = []
        for index in range(n):
            choice_params = params
            if index and params.seed is not None:
                choice_params = dataclasses.replace(params, seed=(params.seed + index) % 2**63)
            job = Job(
                endpoint,
                operation,
                prompt_ids,
                choice_params,
                record.request_id,
                record.start,
                stream,
                index,
            )
            job.deadline = deadline
            job.outcomes = outcomes
            jobs.append(job)
        # The request's own parameters (not a choice's seed + i); nothing changes them afterwards.
        record.request = (operation, params, len(prompt_ids), stream)
        record.outcomes = outcomes
        record.model = self.model_name
        record.policy = self.output_policy
        return jobs

    # --- running --------------------------------------------------------------------------------------
    async def _admit(self, job: Job) -> Callable[[], None]:
        assert self.admission is not None
        try:
            job.queue_seconds = await self.admission.acquire(job.deadline - time.perf_counter())
        except ServerError as exc:
            if isinstance(exc, Overloaded):
                self._log_overload(exc)
            job.timed_out = isinstance(exc, RequestTimeout)
            self._finish(job, None, exc)
            exc.counted = True
            raise
        started = time.perf_counter()
        admission = self.admission
        return lambda: admission.release(time.perf_counter() - started)

    def _run(self, job: Job, on_text: OnText | None) -> GenerationResult:
        """The generation itself (a worker thread for blocking engines), with faults applied."""
        faults = self.faults
        params = job.params
        if faults.enabled:
            if faults.latency_seconds and job.cancel.wait(faults.latency_seconds):
                return GenerationResult([], "", "abort", len(job.prompt_ids))
            if faults.error_rate and self._random.random() < faults.error_rate:
                raise InjectedFault("injected fault (fault_error_rate)")
            if faults.degraded_rate and self._random.random() < faults.degraded_rate:
                params = dataclasses.replace(params, degraded=True)
        return self.engine.generate(job.prompt_ids, params, on_text, job.cancel)

    async def complete(self, job: Job) -> GenerationResult:
        """Run a generation to its end; raises the ServerError the request ends in."""
        release = await self._admit(job)
        if not self.engine.blocking:
            try:
                result = self._run(job, None)
            except Exception as exc:
                self._finish(job, None, exc)
                raise _counted(ModelFailure(f"generation failed: {exc}")) from exc
            finally:
                release()
            self._finish(job, result, None)
            return result
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, job, None)

        def on_done(f: asyncio.Future) -> None:
            release()
            self._finish_future(job, f)

        future.add_done_callback(on_done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), job.deadline - time.perf_counter())
        except TimeoutError:
            job.timed_out = True
            job.cancel.set()  # the worker stops at its next token; its slot is freed then
            raise _counted(self._timeout()) from None
        except asyncio.CancelledError:
            job.cancel.set()  # the client went away
            raise
        except Exception as exc:
            raise _counted(ModelFailure(f"generation failed: {exc}")) from exc

    async def score_prompt(self, job: Job, top: int) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        """The job's prompt tokens with their log-probabilities and `top` alternatives each (echo +
        logprobs), before the job generates: streamed, the prompt's chunk goes out first. A forward
        pass of the model, admitted and bounded by the request's deadline like a generation. Raises
        the ServerError the request ends in."""
        release = await self._admit(job)
        future = self._submit(self.engine.score, job.prompt_ids, top)
        future.add_done_callback(lambda _: release())  # the slot is taken until the pass ends, timeout or not
        try:
            values, tops = await asyncio.wait_for(asyncio.shield(future), job.deadline - time.perf_counter())
        except TimeoutError:
            job.timed_out = True
            self._finish(job, None, None)
            raise _counted(self._timeout()) from None
        except Exception as exc:
            self._finish(job, None, exc)
            raise _counted(ModelFailure(f"scoring the prompt failed: {exc}")) from exc
        return list(zip(job.prompt_ids, values, tops, strict=True))

    async def complete_all(self, jobs: list[Job]) -> list[GenerationResult]:
        """Run a request's choices at once; the first error ends them all and is raised."""
        if len(jobs) == 1:
            return [await self.complete(jobs[0])]
        tasks = [asyncio.ensure_future(self.complete(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def start_stream(self, job: Job) -> AsyncIterator[StreamEvent]:
        """Admit the job (errors raise here, before any byte is sent), then yield (text delta, its
        tokens' log-probabilities, None) and finally ("", [], result). Raises RequestTimeout /
        ModelFailure mid-stream."""
        release = await self._admit(job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        # A blocking engine calls on_text from its worker thread; the others, on the event loop.
        # Chosen once, not per token.
        if self.engine.blocking:

            def on_text(delta: str, tokens: list[TokenLogprobs]) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (delta, tokens))

        else:

            def on_text(delta: str, tokens: list[TokenLogprobs]) -> None:
                queue.put_nowait((delta, tokens))

        future = self._submit(self._run, job, on_text)

        def on_done(f: asyncio.Future) -> None:
            release()
            self._finish_future(job, f)
            queue.put_nowait(done)

        future.add_done_callback(on_done)
        return self._stream_events(job, queue, done, future)

    async def _stream_events(self, job: Job, queue: asyncio.Queue, done: object, future: asyncio.Future):
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), job.deadline - time.perf_counter())
                except TimeoutError:
                    job.timed_out = True
                    job.cancel.set()
                    raise self._timeout() from None
                if item is done:
                    break
                yield item[0], item[1], None
            exc = future.exception()
            if exc is not None:
                raise ModelFailure(f"generation failed: {exc}") from exc
            yield "", [], future.result()
        finally:
            job.cancel.set()  # finished, failed, or the client went away: stop the worker

    async def start_streams(self, jobs: list[Job]) -> AsyncIterator[ChoiceEvent]:
        """`start_stream` for each of a request's choices; yields their events as they come, each
        with its choice's index first. The first error ends them all and is raised."""
        streams = []
        try:
            for job in jobs:
                streams.append(await self.start_stream(job))
        except BaseException:
            for job in jobs:
                job.cancel.set()
            raise
        return _merge(streams, jobs)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`fn(*args)` as a future: on a worker thread for a blocking engine, else run now (the
        no-op and test engines), its result or exception already in the future."""
        loop = asyncio.get_running_loop()
        if self.engine.blocking:
            return loop.run_in_executor(self._executor, fn, *args)
        future = loop.create_future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"request timed out after {self.settings.request_timeout_seconds:g} s (request_timeout_seconds)"
        )

    # --- accounting -----------------------------------------------------------------------------------
    def _finish_future(self, job: Job, future: asyncio.Future) -> None:
        if future.cancelled():
            self._finish(job, None, asyncio.CancelledError())
        elif future.exception() is not None:
            self._finish(job, None, future.exception())
        else:
            self._finish(job, future.result(), None)

    def _finish(self, job: Job, result: GenerationResult | None, error: BaseException | None) -> None:
        """Once per job: metrics, log fields, drift signals."""
        if job.finished:
            return
        job.finished = True
        now = time.perf_counter()
        gm = self.metrics.generation[job.endpoint]
        if isinstance(error, ServerError):
            kind = error.error_kind
        elif error is not None:
            kind = "model_error"
        else:
            kind = None
        if job.timed_out:
            kind = "timeout"
        if kind is not None:
            gm.error(kind)
            if kind == "model_error" and error is not None:
                log.error(
                    "generation failed",
                    exc_info=error,
                    extra={"fields": {"event": "error", "request_id": job.request_id, "http.route": job.endpoint}},
                )
        if kind in ("overloaded", "invalid_input", "not_ready"):
            job.outcomes[job.index] = (kind, None, 0, None, None, 0.0, 0, 0.0, None, 0)
            return  # refused before generating: nothing more to record
        if job.timed_out:
            finish_reason = "timeout"
        elif error is not None:
            finish_reason = "error"
        else:
            assert result is not None
            finish_reason = result.finish_reason
        token_times = result.token_times if result else []
        output_tokens = result.output_tokens if result else 0
        perplexity = result.perplexity if result else None
        empty = not (result and result.text.strip())
        repetitive = is_repetitive(result.token_ids) if result else False
        if self.metrics.enabled:  # the uninstrumented baseline builds no observation either
            gm.observe(
                (
                    job.queue_seconds,
                    job.start,
                    token_times,
                    len(job.prompt_ids),
                    output_tokens,
                    perplexity,
                    finish_reason,
                    empty and error is None and not job.timed_out,
                    repetitive,
                    job.params.grammar is not None,
                )
            )
        grammar = job.params.grammar
        if grammar is not None and result is not None and result.structured_complete is not None:
            self.metrics.structured_output(grammar.format, result.structured_complete)
        job.outcomes[job.index] = (
            kind,
            finish_reason,
            output_tokens,
            job.queue_seconds,
            token_times[0] - job.start if token_times else None,
            token_times[-1] - token_times[0] if token_times else 0.0,
            len(token_times) - 1 if token_times else 0,
            result.logprob_sum if result else 0.0,
            result.text if result else None,
            result.cached_tokens if result else 0,
        )
        self.signals.observe(
            RequestSignals(
                model=self.model_name,
                endpoint=job.endpoint,
                perplexity=perplexity,
                prompt_tokens=len(job.prompt_ids),
                output_tokens=output_tokens,
                finish_reason=finish_reason,
                empty=empty,
                repetitive=repetitive,
                error=error is not None or job.timed_out,
                latency_seconds=now - job.start,
                structured=job.params.grammar is not None,
            )
        )

    def _log_overload(self, exc: Overloaded) -> None:
        now = time.monotonic()
        if now - self._last_overload_log >= 1.0:  # at most one line a second under a flood
            self._last_overload_log = now
            log.warning(exc.message, extra={"fields": {"event": "overloaded"}})


async def _merge(streams: list[AsyncIterator[StreamEvent]], jobs: list[Job]) -> AsyncIterator[ChoiceEvent]:
    """The events of the choices' streams in the order they come; the first error is raised, and
    ending (error, or the client gone) stops every choice's generation."""
    if len(streams) == 1:
        async for delta, tokens, result in streams[0]:
            yield 0, delta, tokens, result
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
            queue.put_nowait((index, end))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event is end:
                running -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield (index, *event)
    finally:
        for job in jobs:
            job.cancel.set()  # also the workers of streams that never started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
