"""`GenerationService`: what the routers call. Request checks, deadlines (queue + generation; 504
after), admission, running blocking generation in worker threads that can be stopped between tokens,
streaming, fault injection; the accounting once per generation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from slm_server.errors import (
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    ServerError,
)
from slm_server.generation.structured import GrammarError, OutputGrammar
from slm_server.generation.types import Engine, GenerationResult, OnText, PromptToken, SamplingParams, TokenLogprobs
from slm_server.logs import OutputLogPolicy
from slm_server.metrics import NullMetrics, ServerMetrics
from slm_server.protocol import ChoiceConstraint, JsonConstraint, RegexConstraint
from slm_server.service.accounting import Accounting
from slm_server.service.admission import Admission
from slm_server.service.faults import Faults, InjectedFault
from slm_server.service.jobs import Job, Outcome, RequestParams, RequestRecord
from slm_server.service.streaming import ChoiceEvent, StreamEvent, TextPiece, merge, stream_events
from slm_server.settings import Settings
from slm_server.signals import NoopObserver, SignalObserver

log = logging.getLogger("slm_server.service")
T = TypeVar("T")


def _counted(exc: ServerError) -> ServerError:
    """Mark an error the job accounting counts, so the HTTP error handler does not."""
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
        self.accounting = Accounting(metrics, self.signals, self.model_name)
        self._executor: ThreadPoolExecutor | None = None
        self._random = random.Random()

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
        """The compiled grammar of `spec` (slm_server.generation.structured.GrammarCompiler.compile; `param`: the
        request field it came from): from the compiler's cache, or compiled in a worker thread (a large
        schema takes long; the event loop goes on)."""
        grammars = self.engine.grammars
        if grammars is None:
            field = param.split(".")[0]
            raise InvalidInput(f"{field}: this model has no structured output (it needs a fast tokenizer)", param=field)
        key = grammars.key(format, spec)
        grammar = grammars.cached(key)
        if grammar is None:
            try:
                grammar = await asyncio.to_thread(grammars.compile, key, format, spec, param)
            except GrammarError as exc:
                raise InvalidInput(str(exc), param=exc.param) from None
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
        record.request = RequestParams(operation, params, len(prompt_ids), stream)
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
                self.accounting.log_overload(exc)
            job.timed_out = isinstance(exc, RequestTimeout)
            self.accounting.finish(job, None, exc)
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
                self.accounting.finish(job, None, exc)
                raise _counted(ModelFailure(f"generation failed: {exc}")) from exc
            finally:
                release()
            self.accounting.finish(job, result, None)
            return result
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, job, None)

        def on_done(f: asyncio.Future[GenerationResult]) -> None:
            release()
            self.accounting.finish_future(job, f)

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

    async def score_prompt(self, job: Job, top: int) -> list[PromptToken]:
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
            self.accounting.finish(job, None, None)
            raise _counted(self._timeout()) from None
        except Exception as exc:
            self.accounting.finish(job, None, exc)
            raise _counted(ModelFailure(f"scoring the prompt failed: {exc}")) from exc
        return [PromptToken(*entry) for entry in zip(job.prompt_ids, values, tops, strict=True)]

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
        """Admit the job (errors raise here, before any byte is sent), then its events
        (`streaming.stream_events`): RequestTimeout or ModelFailure raise mid-stream."""
        release = await self._admit(job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextPiece | None] = asyncio.Queue()  # None: the generation ended

        # A blocking engine calls on_text from its worker thread; the others, on the event loop.
        # Chosen once, not per token.
        if self.engine.blocking:

            def on_text(delta: str, tokens: list[TokenLogprobs]) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, TextPiece(delta, tokens))

        else:

            def on_text(delta: str, tokens: list[TokenLogprobs]) -> None:
                queue.put_nowait(TextPiece(delta, tokens))

        future = self._submit(self._run, job, on_text)

        def on_done(f: asyncio.Future[GenerationResult]) -> None:
            release()
            self.accounting.finish_future(job, f)
            queue.put_nowait(None)

        future.add_done_callback(on_done)
        return stream_events(job, queue, future, self._timeout)

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
        return merge(streams, jobs)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` as a future: on a worker thread for a blocking engine, else run now (the
        no-op and test engines), its result or exception already in the future."""
        loop = asyncio.get_running_loop()
        if self.engine.blocking:
            return loop.run_in_executor(self._executor, fn, *args)
        future: asyncio.Future[T] = loop.create_future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"request timed out after {self.settings.request_timeout_seconds:g} s (request_timeout_seconds)"
        )
