"""Once per generation, when it ends (done, failed, timed out, refused): its metrics, its request
line's fields (an `Outcome` in the request's record) and its drift signals."""

from __future__ import annotations

import asyncio
import logging
import time

from slm_server.errors import Overloaded, ServerError
from slm_server.generation.structured import GrammarFailed
from slm_server.generation.types import GenerationResult
from slm_server.metrics import GenerationFigures, NullMetrics, ServerMetrics
from slm_server.service.jobs import Job, Outcome
from slm_server.signals import RequestSignals, SignalObserver, is_repetitive

log = logging.getLogger("slm_server.service")

# Errors of requests refused before they generated: nothing more to record than the error.
_REFUSALS = frozenset({"overloaded", "invalid_input", "not_ready"})


class Accounting:
    def __init__(self, metrics: ServerMetrics | NullMetrics, signals: SignalObserver, model_name: str):
        self.metrics = metrics
        self.signals = signals
        self.model_name = model_name
        self._last_overload_log = 0.0

    def finish_future(self, job: Job, future: asyncio.Future[GenerationResult]) -> None:
        """`finish` with what a generation's future holds."""
        if future.cancelled():
            self.finish(job, None, asyncio.CancelledError())
        elif future.exception() is not None:
            self.finish(job, None, future.exception())
        else:
            self.finish(job, future.result(), None)

    def finish(self, job: Job, result: GenerationResult | None, error: BaseException | None) -> None:
        """Once per job: metrics, log fields, drift signals."""
        if job.finished:
            return
        job.finished = True
        now = time.perf_counter()
        gm = self.metrics.generation[job.endpoint]
        if isinstance(error, ServerError):
            kind: str | None = error.error_kind
        elif isinstance(error, GrammarFailed):  # the request's grammar went past the parser's limits
            kind = "invalid_input"
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
        if kind in _REFUSALS:
            job.outcomes[job.index] = Outcome.refused(kind)
            return
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
        structured = job.params.grammar is not None
        if self.metrics.enabled:  # the uninstrumented baseline builds no figures either
            gm.observe(
                GenerationFigures(
                    queue_seconds=job.queue_seconds,
                    start=job.start,
                    token_times=token_times,
                    prompt_tokens=len(job.prompt_ids),
                    output_tokens=output_tokens,
                    perplexity=perplexity,
                    finish_reason=finish_reason,
                    empty=empty and error is None and not job.timed_out,
                    repetitive=repetitive,
                    structured=structured,
                )
            )
        grammar = job.params.grammar
        if grammar is not None and result is not None and result.structured_complete is not None:
            self.metrics.structured_output(grammar.format, result.structured_complete)
        job.outcomes[job.index] = Outcome(
            error_type=kind,
            finish_reason=finish_reason,
            output_tokens=output_tokens,
            queue_seconds=job.queue_seconds,
            time_to_first_token=token_times[0] - job.start if token_times else None,
            decode_seconds=token_times[-1] - token_times[0] if token_times else 0.0,
            gaps=len(token_times) - 1 if token_times else 0,
            logprob_sum=result.logprob_sum if result else 0.0,
            text=result.text if result else None,
            cached_tokens=result.cached_tokens if result else 0,
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
                structured=structured,
            )
        )

    def log_overload(self, exc: Overloaded) -> None:
        now = time.monotonic()
        if now - self._last_overload_log >= 1.0:  # at most one line a second under a flood
            self._last_overload_log = now
            log.warning(exc.message, extra={"fields": {"event": "overloaded"}})
