"""The server as a real process (uvicorn on a free loopback port), driven by the official `openai` client."""

from __future__ import annotations

import signal
import threading
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from .conftest import MODEL_NAME, server_process, wait_for

pytestmark = pytest.mark.dataplane


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    with server_process(tiny_model_dir, tmp_path_factory.mktemp("live")) as proc:
        yield proc


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_streams_a_completion(client):
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="Return the number of",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        seed=4,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= 12
    # The same request without streaming gives the same text (same seed).
    whole = client.completions.create(model=MODEL_NAME, prompt="Return the number of", max_tokens=12, seed=4)
    assert whole.choices[0].text == text


def test_openai_client_streams_a_chat(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What does open() return?"}], max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert isinstance(content, str)


def test_openai_client_non_streaming_and_models(client):
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 3
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_openai_client_reads_logprobs_and_echo(client):
    completion = client.completions.create(model=MODEL_NAME, prompt="Return the", max_tokens=3, logprobs=2, echo=True)
    choice = completion.choices[0]
    assert choice.text.startswith("Return the")
    assert choice.logprobs.token_logprobs[0] is None  # the prompt's first token has no context
    assert len(choice.logprobs.tokens) == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Return the", max_tokens=3, logprobs=2, echo=True, stream=True, seed=5
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[0].text == "Return the" and chunks[0].logprobs.token_logprobs[0] is None
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    same = client.completions.create(model=MODEL_NAME, prompt="Return the", max_tokens=3, logprobs=2, echo=True, seed=5)
    assert streamed == same.choices[0].logprobs.tokens


def test_openai_client_sends_token_ids_logit_bias_and_vllm_extensions_and_reads_cached_tokens(client, tiny_model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode("Return the number of")
    as_text = client.completions.create(model=MODEL_NAME, prompt="Return the number of", max_tokens=6, temperature=0)
    as_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == len(ids)
    forced = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0, logit_bias={"42": 100}, logprobs=0
    )
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1  # token 42, three times
    extended = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0.8, seed=3,
        extra_body={"repetition_penalty": 1.2, "min_p": 0.05, "top_k": 20},
    )  # fmt: skip
    assert extended.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="is not in the model's vocabulary"):
        client.completions.create(model=MODEL_NAME, prompt=[10**6], max_tokens=2)
    # A chat that begins like the one before: the client reads the prompt tokens found in the prefix cache.
    system = {"role": "system", "content": "Answer about the file and the list in one short line. " * 3}
    usages = [
        client.chat.completions.create(
            model=MODEL_NAME, messages=[system, {"role": "user", "content": question}], max_tokens=2
        ).usage
        for question in ("What does it return?", "Is the list empty?")
    ]
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert 32 <= usages[1].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens


def test_openai_client_streams_several_chat_choices_with_logprobs(client):
    request: dict = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What does open() return?"}],
        "max_tokens": 6,
        "n": 2,
        "seed": 9,
    }
    stream = client.chat.completions.create(
        **request, logprobs=True, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, int] = {0: 0, 1: 0}
    for chunk in chunks:
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            tokens[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
    assert chunks[-1].usage.completion_tokens == tokens[0] + tokens[1]
    whole = client.chat.completions.create(**request)  # the same choices without streaming
    assert [c.message.content for c in whole.choices] == [content[0], content[1]]


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    lines: int = pydantic.Field(ge=0, le=999)


def test_openai_client_parses_structured_output_into_its_pydantic_model(client):
    """The client turns the model into a strict JSON schema, sends it as response_format, and parses
    the reply with the same model: it raises if the JSON does not follow it."""
    messages = [{"role": "user", "content": "How many lines has the file?"}]
    parsed = client.chat.completions.parse(model=MODEL_NAME, messages=messages, response_format=Verdict, max_tokens=40)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    assert parsed.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(
        model=MODEL_NAME, messages=messages, response_format=Verdict, max_tokens=40, seed=4
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Verdict)


class GetWeather(pydantic.BaseModel):
    city: Literal["Paris", "Oslo"]
    unit: Literal["C", "F"]


def test_openai_client_parses_tool_calls_into_its_pydantic_model(client):
    """`pydantic_function_tool` makes a strict function tool of the model; `parse` reads each call's
    arguments back into it (and raises if they do not follow it), streamed and not."""
    request = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Is it cold in Oslo?"}],
        "tools": [openai.pydantic_function_tool(GetWeather)],
        "tool_choice": {"type": "function", "function": {"name": "GetWeather"}},
        "max_tokens": 80,
    }
    parsed = client.chat.completions.parse(**request)
    (call,) = parsed.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert parsed.choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(
        **{**request, "tool_choice": "required", "parallel_tool_calls": False}
    ) as stream:
        final = stream.get_final_completion()
    assert all(isinstance(c.function.parsed_arguments, GetWeather) for c in final.choices[0].message.tool_calls)


def test_openai_client_surfaces_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum is 512"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=9)


def test_every_output_line_is_json_uvicorn_included(live, client):
    client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    httpx.get(f"{live.base_url}/metrics")
    # Request lines are written in batches (of 32, or every log_flush_interval_seconds: 0.1 s by default).
    records = wait_for(lambda: any(r.get("event") == "request" for r in live.records()) and live.records())
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers  # "Uvicorn running on ...", routed into the JSON handler
    events = {r.get("event") for r in records}
    assert {"startup", "gpu_missing", "model_loaded", "request"} <= events


def test_metrics_scrape_over_http(live, client):
    client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    r = httpx.get(f"{live.base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'api_requests_total{endpoint="/v1/completions",status="200"}' in r.text


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir, tmp_path):
    env = {"SLM_FAULT_INJECTION": "true", "SLM_FAULT_LATENCY_SECONDS": "2"}
    with server_process(tiny_model_dir, tmp_path, env=env) as proc:
        result: dict = {}

        def slow_request():
            r = httpx.post(f"{proc.base_url}/generate", json={"prompt": "x", "max_tokens": 3}, timeout=30)
            result["status"] = r.status_code

        worker = threading.Thread(target=slow_request)
        worker.start()
        in_flight = 'slm_requests_in_flight{model="tiny"} 1.0'
        wait_for(lambda: in_flight in httpx.get(f"{proc.base_url}/metrics").text)  # 2 s of injected latency
        proc.proc.send_signal(signal.SIGTERM)
        worker.join(timeout=30)
        # uvicorn re-raises the signal once it has shut down gracefully (143 to Kubernetes, as usual).
        assert proc.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert result.get("status") == 200
        events = [r.get("event") for r in proc.records()]
        assert events.count("shutdown") == 2
        assert events.index("request") < len(events) - 1


def test_a_client_that_leaves_a_stream_stops_its_generations(tiny_model_dir, tmp_path):
    env = {"SLM_FAULT_INJECTION": "true", "SLM_FAULT_LATENCY_SECONDS": "8"}
    with server_process(tiny_model_dir, tmp_path, env=env) as proc:
        body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "n": 2, "stream": True}
        with httpx.stream("POST", f"{proc.base_url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            wait_for(lambda: 'slm_requests_in_flight{model="tiny"} 2.0' in httpx.get(f"{proc.base_url}/metrics").text)
        # Gone before the first token: both choices end as aborted at once, not after the 8 s of latency.
        aborted = 'slm_request_finish_total{endpoint="/v1/completions",finish_reason="abort",model="tiny"} 2.0'
        wait_for(lambda: aborted in httpx.get(f"{proc.base_url}/metrics").text, seconds=4)
        assert 'slm_requests_in_flight{model="tiny"} 0.0' in httpx.get(f"{proc.base_url}/metrics").text
