"""A request's record (what its log line says) and its jobs (one generation per choice)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from slm_server.generation.types import SamplingParams
from slm_server.logs import OutputLogPolicy


class Outcome(NamedTuple):
    """What a generation's end leaves in its request's record for the log line: atoms only, so a line
    waiting in the log writer's batch keeps nothing else alive (no job, result, or token list; many
    objects kept per request cost the garbage collector and the CPU caches more than the line)."""

    error_type: str | None
    finish_reason: str | None  # None: refused before it generated
    output_tokens: int
    queue_seconds: float | None
    time_to_first_token: float | None
    decode_seconds: float  # from the first token to the last
    gaps: int  # between tokens: output tokens - 1
    logprob_sum: float  # of the generated tokens
    text: str | None
    cached_tokens: int  # prompt tokens found in the prefix cache

    @classmethod
    def refused(cls, error_type: str) -> Outcome:
        return cls(error_type, None, 0, None, None, 0.0, 0, 0.0, None, 0)


class RequestParams(NamedTuple):
    """A generation request's own parameters, once its jobs are made."""

    operation: str  # gen_ai.operation.name: text_completion | chat
    params: SamplingParams  # the request's (not a choice's seed + i)
    prompt_tokens: int
    stream: bool


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
        self.request: RequestParams | None = None  # once a job is made
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
        params = request.params
        fields["gen_ai.operation.name"] = request.operation
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
        fields["gen_ai.usage.input_tokens"] = request.prompt_tokens
        fields["slm.stream"] = request.stream
        outcomes, policy = self.outcomes, self.policy
        if len(outcomes) == 1:
            outcome = outcomes[0]
            if outcome is not None:
                output = policy.fields(outcome.text) if policy is not None and outcome.text is not None else None
                _outcome_fields(fields, outcome, self.model, output)
            return
        sampled = policy is not None and policy.sampled()
        choices = []
        for index, outcome in enumerate(outcomes):
            choice: dict[str, Any] = {"slm.choice.index": index}
            if outcome is not None:
                output = None
                if sampled and policy is not None and outcome.text is not None:
                    output = policy.describe(outcome.text)
                _outcome_fields(choice, outcome, self.model, output)
            choices.append(choice)
        fields["gen_ai.request.choice.count"] = len(outcomes)
        _totals(fields, [o for o in outcomes if o is not None], self.model)
        fields["slm.choices"] = choices


def _outcome_fields(fields: dict[str, Any], outcome: Outcome, model: str, output: dict[str, Any] | None) -> None:
    """The fields of one generation, into `fields`."""
    if outcome.error_type is not None:
        fields["error.type"] = outcome.error_type
    if outcome.finish_reason is None:
        return
    fields["gen_ai.response.model"] = model
    fields["gen_ai.usage.output_tokens"] = outcome.output_tokens
    fields["gen_ai.usage.cache_read.input_tokens"] = outcome.cached_tokens
    fields["gen_ai.response.finish_reasons"] = [outcome.finish_reason]
    fields["slm.queue_time_s"] = outcome.queue_seconds
    if outcome.time_to_first_token is not None:
        fields["gen_ai.server.time_to_first_token"] = outcome.time_to_first_token
        if outcome.gaps:
            fields["gen_ai.server.time_per_output_token"] = outcome.decode_seconds / outcome.gaps
    tokens = outcome.output_tokens
    fields["slm.perplexity"] = math.exp(-outcome.logprob_sum / tokens) if tokens else None
    if output:
        fields.update(output)


def _totals(fields: dict[str, Any], outcomes: list[Outcome], model: str) -> None:
    """The fields of a request of several choices, over all of them, into `fields`."""
    errors = [o.error_type for o in outcomes if o.error_type is not None]
    if errors:
        fields["error.type"] = errors[0]
    ended = [o for o in outcomes if o.finish_reason is not None]
    if not ended:
        return
    tokens = sum(o.output_tokens for o in ended)
    waits = [o.queue_seconds for o in ended if o.queue_seconds is not None]
    firsts = [o.time_to_first_token for o in ended if o.time_to_first_token is not None]
    gaps = sum(o.gaps for o in ended)
    fields["gen_ai.response.model"] = model
    fields["gen_ai.usage.output_tokens"] = tokens
    fields["gen_ai.response.finish_reasons"] = [o.finish_reason for o in ended]
    fields["slm.queue_time_s"] = max(waits) if waits else None
    if firsts:
        fields["gen_ai.server.time_to_first_token"] = min(firsts)
    if gaps:
        fields["gen_ai.server.time_per_output_token"] = sum(o.decode_seconds for o in ended) / gaps
    # The perplexity of all the generated tokens together: exp of their mean negative log-likelihood.
    fields["slm.perplexity"] = math.exp(-sum(o.logprob_sum for o in ended) / tokens) if tokens else None


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
