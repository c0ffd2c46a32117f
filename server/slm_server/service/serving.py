"""`GenerationService`: what the routers call. Request checks, deadlines (from arrival: the body,
the preparation, the queue and the generation; 504 after), admission, running blocking generation in
worker threads that can be stopped between tokens, streaming, fault injection; the accounting once
per generation.

What a request makes before it generates — its prompt or chat tokenized, its grammar compiled —
runs in preparation threads (`prepare`), admitted like generations: at most max_concurrent_requests
at once and max_queued_requests waiting, 429 beyond. A hostile request (a huge chat, a grammar that
compiles for seconds) so takes a bounded share of the machine and never the event loop, and cannot
take the generation slots of the requests already admitted; a grammar also has its own timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from slm_server import tool_calls
from slm_server.errors import (
    ClientDisconnected,
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    ServerError,
)
from slm_server.generation.structured import GrammarError, GrammarFailed, OutputGrammar
from slm_server.generation.types import (
    Engine,
    GenerationResult,
    OnText,
    PromptError,
    PromptToken,
    SamplingParams,
    TokenLogprobs,
)
from slm_server.logs import OutputLogPolicy
from slm_server.metrics import NullMetrics, ServerMetrics
from slm_server.protocol import ChatMessage, ChatTool, ChoiceConstraint, JsonConstraint, RegexConstraint
from slm_server.service.accounting import Accounting
from slm_server.service.admission import Admission
from slm_server.service.faults import Faults, InjectedFault
from slm_server.service.jobs import Job, Outcome, RequestParams, RequestRecord
from slm_server.service.streaming import ChoiceEvent, StreamEvent, TextPiece, merge, stream_events
from slm_server.settings import Settings
from slm_server.signals import NoopObserver, SignalObserver

log = logging.getLogger("slm_server.service")
T = TypeVar("T")
# Prompts longer than this are tokenized in a preparation thread; shorter ones at once (a thread's
# hand-off would cost more than the tokenization).
INLINE_TOKENIZE_CHARS = 16_384


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
        self.preparation: Admission | None = None
        self.accounting = Accounting(metrics, self.signals, self.model_name)
        self._executor: ThreadPoolExecutor | None = None
        self._preparers: ThreadPoolExecutor | None = None
        self._random = random.Random()

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop (called from the lifespan)."""
        admission = self.admission = Admission(self.settings.max_concurrent_requests, self.settings.max_queued_requests)
        self.metrics.watch_load(lambda: admission.in_flight, lambda: admission.queued)
        self.metrics.max_concurrent.set(self.settings.max_concurrent_requests)
        self.metrics.max_queued.set(self.settings.max_queued_requests)
        self.metrics.fault_injection.set_function(self.faults_possible)
        limit = self.settings.max_concurrent_requests
        self.preparation = Admission(limit, self.settings.max_queued_requests)
        self._preparers = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="slm-prepare")
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
        for pool in (self._executor, self._preparers):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def faults_possible(self) -> float:
        """1 while faults can be injected — the admin API is on (anyone who reaches it may set one), or a
        fault is set — else 0: the slm_fault_injection_enabled gauge, read when scraped."""
        f = self.faults
        on = self.settings.fault_admin_api or (f.enabled and (f.error_rate or f.latency_seconds or f.degraded_rate))
        return 1.0 if on else 0.0

    # --- preparation: tokenizing, compiling ---------------------------------------------------------------
    def deadline(self, record: RequestRecord) -> float:
        """The request's deadline (perf_counter): request_timeout_seconds after its arrival."""
        return record.start + self.settings.request_timeout_seconds

    async def prepare(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a preparation thread, admitted (Overloaded: 429 beyond the queue) and awaited
        until `deadline` (perf_counter; RequestTimeout after). The thread's slot is taken until `fn`
        returns, whether the request still waits for it or not. A PromptError becomes a 400."""
        preparation = self.preparation
        assert preparation is not None and self._preparers is not None
        try:
            await preparation.acquire(deadline - time.perf_counter())
        except Overloaded as exc:
            self.accounting.log_overload(exc)
            raise
        future = asyncio.get_running_loop().run_in_executor(self._preparers, fn, *args)
        future.add_done_callback(lambda _: preparation.release())
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline - time.perf_counter())
        except TimeoutError:
            raise self._timeout() from None
        except PromptError as exc:
            raise InvalidInput(str(exc), param=exc.param) from None

    async def encode(self, text: str, record: RequestRecord, param: str = "prompt") -> list[int]:
        """The tokens of a prompt: at once when it is short, else in a preparation thread."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            try:
                return self.engine.encode(text)
            except PromptError as exc:
                raise InvalidInput(str(exc), param=param) from None
        return await self.prepare(self.deadline(record), self.engine.encode, text)

    async def encode_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[ChatTool] | None, record: RequestRecord
    ) -> list[int]:
        """The tokens of a chat (its messages, and the tools shown to the model) through the model's chat
        template, in a preparation thread: a template is Python, and a chat may be a megabyte of it."""

        def encode() -> list[int]:
            return self.engine.encode_chat(tool_calls.template_messages(messages), tool_calls.template_tools(tools))

        return await self.prepare(self.deadline(record), encode)

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

    async def sampling(self, body: Any, record: RequestRecord) -> dict[str, Any]:
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
            grammar = await self._requested_grammar(body.response_format, body.structured_outputs, record)
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

    async def _requested_grammar(
        self, response_format: Any, structured: Any, record: RequestRecord
    ) -> OutputGrammar | None:
        """The grammar a request's response_format or structured_outputs asks for (at most one)."""
        if structured is not None:
            if response_format is not None and response_format.type != "text":
                raise InvalidInput(
                    "response_format and structured_outputs both say what the output must be: give one",
                    param="structured_outputs",
                )
            if isinstance(structured, JsonConstraint):
                schema = structured.json_schema
                return await self.output_grammar("json_schema", schema, "structured_outputs.json", record)
            if isinstance(structured, RegexConstraint):
                return await self.output_grammar("regex", structured.regex, "structured_outputs.regex", record)
            if isinstance(structured, ChoiceConstraint):
                return await self.output_grammar("choice", structured.choice, "structured_outputs.choice", record)
            return await self.output_grammar("grammar", structured.grammar, "structured_outputs.grammar", record)
        if response_format.type == "json_schema":
            schema = response_format.json_schema.definition
            return await self.output_grammar("json_schema", schema, "response_format.json_schema.schema", record)
        if response_format.type == "json_object":
            return await self.output_grammar("json_object", None, "response_format", record)
        return None

    async def output_grammar(self, format: str, spec: Any, param: str, record: RequestRecord) -> OutputGrammar:
        """The compiled grammar of `spec` (slm_server.generation.structured.GrammarCompiler.compile; `param`:
        the request field it came from): from the compiler's cache, or compiled in a preparation thread
        within grammar_compile_timeout_seconds (400 after) and the request's deadline."""
        grammars = self.engine.grammars
        if grammars is None:
            field = param.split(".")[0]
            raise InvalidInput(f"{field}: this model has no structured output (it needs a fast tokenizer)", param=field)
        try:
            key = grammars.key(format, spec, param)
            grammar = grammars.cached(key)
            if grammar is not None:
                return grammar
            limit = self.settings.grammar_compile_timeout_seconds
            deadline = self.deadline(record)
            compile_by = time.perf_counter() + limit
            try:
                return await self.prepare(min(deadline, compile_by), grammars.compile, key, format, spec, param)
            except RequestTimeout:
                if compile_by > deadline:
                    raise  # the request's own deadline came first: 504
                raise InvalidInput(
                    f"{param}: the grammar did not compile within {limit:g} s (grammar_compile_timeout_seconds)",
                    param=param,
                ) from None
        except GrammarError as exc:
            raise InvalidInput(str(exc), param=exc.param) from None

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
                raise _counted(self._failure(exc)) from exc
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
            raise _counted(self._failure(exc)) from exc

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

    async def complete_all(
        self, jobs: list[Job], disconnected: Callable[[], Awaitable[None]] | None = None
    ) -> list[GenerationResult]:
        """Run a request's choices at once; the first error ends them all and is raised. With
        `disconnected` (returns once the client has gone), a client that goes away stops them all
        (ClientDisconnected): nothing would read the response."""
        if disconnected is None or not self.engine.blocking:  # a non-blocking engine is done already
            return await self._complete_all(jobs)
        work = asyncio.ensure_future(self._complete_all(jobs))
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            watcher.cancel()
        if not work.done():  # the client went away
            for job in jobs:
                job.cancel.set()
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise ClientDisconnected("the client closed the connection before the response")
        return work.result()

    async def _complete_all(self, jobs: list[Job]) -> list[GenerationResult]:
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
        return stream_events(job, queue, future, self._timeout, self._failure)

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

    @staticmethod
    def _failure(exc: BaseException) -> ServerError:
        """What a generation's failure is to the client: its grammar's fault (400), or the model's (500)."""
        if isinstance(exc, GrammarFailed):
            return InvalidInput(str(exc))
        return ModelFailure(f"generation failed: {exc}")

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"request timed out after {self.settings.request_timeout_seconds:g} s (request_timeout_seconds)"
        )
