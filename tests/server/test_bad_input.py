"""Every bad input of the issue gets a 4xx/5xx that says what is wrong; the process never dies."""

from __future__ import annotations

import threading
import time

import pytest

from slm_server.settings import Settings

from .conftest import MODEL_NAME, one_slot_settings, serve, settings_for, wait_for

GEN = {"model": MODEL_NAME}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {}, "prompt"),
        ("/generate", {"prompt": 3}, "prompt"),
        ("/generate", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/generate", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/generate", {"prompt": "x", "temperature": 5}, "temperature"),
        ("/generate", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/generate", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/generate", {"prompt": "x", "surprise": 1}, "surprise"),
        # JSON types as the document says them: no true for an integer, 1 for a boolean, "1" for a number.
        ("/generate", {"prompt": "x", "top_k": False}, "top_k"),
        ("/generate", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/generate", {"prompt": "x", "max_tokens": 5.5}, "max_tokens"),
        ("/generate", {"prompt": "x", "stream": 1}, "stream"),
        ("/generate", {"prompt": "x", "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**GEN, "messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {**GEN, "prompt": "x", "n": 0}, "n"),
        ("/v1/chat/completions", {**GEN, "messages": [{"role": "user", "content": "x"}], "n": 129}, "n"),
        ("/v1/completions", {**GEN, "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {**GEN, "prompt": [[1, 2], [3]]}, "prompt"),
        ("/v1/completions", {**GEN, "prompt": [5, -1]}, "prompt"),
        ("/v1/completions", {**GEN, "prompt": []}, "prompt"),
        ("/v1/completions", {**GEN, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/chat/completions", {**GEN, "messages": []}, "messages"),
        ("/v1/chat/completions", {**GEN, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {**GEN, "messages": [{"role": "user"}]}, "messages.0.content"),
    ],
)
def test_schema_errors_are_422_naming_the_field(server, path, body, field):
    r = server.client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert field in error["message"]
    assert error["param"].startswith(field.split(".")[0])


def test_a_body_that_is_not_json_is_422(server):
    r = server.client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_unknown_model_is_404_naming_the_served_one(server):
    r = server.client.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert r.status_code == 404
    assert MODEL_NAME in r.json()["error"]["message"]


def test_prompt_longer_than_the_context_is_400_saying_the_limit(server):
    r = server.client.post("/generate", json={"prompt": "word " * 400, "max_tokens": 1})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "context is 256 tokens" in message


def test_prompt_plus_max_tokens_over_the_context_is_400(server):
    r = server.client.post("/v1/completions", json={**GEN, "prompt": "word " * 100, "max_tokens": 200})
    assert r.status_code == 400
    assert "context is 256 tokens" in r.json()["error"]["message"]


def test_a_prompt_of_token_ids_outside_the_vocabulary_is_400_naming_the_id(server):
    r = server.client.post("/v1/completions", json={**GEN, "prompt": [5, 2048, 7], "max_tokens": 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "prompt: token id 2048 is not in the model's vocabulary (ids 0 to 2047)"
    assert error["param"] == "prompt"
    too_long = server.client.post("/v1/completions", json={**GEN, "prompt": [5] * 300, "max_tokens": 1})
    assert too_long.status_code == 400 and "context is 256 tokens" in too_long.json()["error"]["message"]


def test_max_tokens_over_the_cap_is_400_saying_the_cap(server):
    r = server.client.post("/generate", json={"prompt": "x", "max_tokens": 513})
    assert r.status_code == 400
    assert "maximum is 512" in r.json()["error"]["message"]
    chat = server.client.post(
        "/v1/chat/completions",
        json={**GEN, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000},
    )
    assert chat.status_code == 400 and "max_completion_tokens" in chat.json()["error"]["message"]


def test_a_body_over_the_size_cap_is_413_saying_the_limit(tiny_engine, tiny_model_dir):
    with serve(tiny_engine, settings_for(tiny_model_dir, max_body_bytes=2048)) as srv:
        r = srv.client.post("/generate", json={"prompt": "x" * 4000})
        assert r.status_code == 413
        assert "2048 bytes" in r.json()["error"]["message"]

        def chunks():  # no content-length: the limit applies while reading
            for _ in range(8):
                yield b" " * 512

        r = srv.client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "2048 bytes" in r.json()["error"]["message"]
        assert srv.client.post("/generate", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_a_request_over_the_timeout_is_504_and_counted(tiny_engine, tiny_model_dir):
    settings = settings_for(
        tiny_model_dir, request_timeout_seconds=0.5, fault_injection=True, fault_latency_seconds=5.0
    )
    with serve(tiny_engine, settings) as srv:
        r = srv.client.post("/generate", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 504
        assert "0.5 s" in r.json()["error"]["message"]
        srv.client.app.state.service.faults.latency_seconds = 0.0
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200
        labels = {"model": MODEL_NAME, "endpoint": "/generate"}
        assert srv.metric("slm_request_errors_total", {**labels, "error": "timeout"}) == 1
        assert srv.metric("slm_request_finish_total", {**labels, "finish_reason": "timeout"}) == 1
        assert srv.metric("api_requests_total", {"endpoint": "/generate", "status": "504"}) == 1


class _SlowScoring:
    """The tiny model with its prompt-scoring pass made to take 1 s (a wrapper: no real pass of the
    tiny model takes that long on a CPU)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score(self, ids, top):
        time.sleep(1.0)
        return self._engine.score(ids, top)


def test_a_prompt_scored_past_the_timeout_is_504_before_the_stream_starts(tiny_engine, tiny_model_dir):
    """echo + logprobs + stream scores the prompt before streaming: a timeout there is a plain 504,
    counted, and the slot stays taken until the pass really ends."""
    with serve(_SlowScoring(tiny_engine), settings_for(tiny_model_dir, request_timeout_seconds=0.3)) as srv:
        body = {**GEN, "prompt": "Return the", "echo": True, "logprobs": 1, "stream": True, "max_tokens": 2}
        r = srv.client.post("/v1/completions", json=body)
        assert r.status_code == 504 and "0.3 s" in r.json()["error"]["message"]
        in_flight = {"model": MODEL_NAME}
        assert srv.metric("slm_requests_in_flight", in_flight) == 1  # the pass runs on for ~0.7 s
        wait_for(lambda: srv.metric("slm_requests_in_flight", in_flight) == 0)
        labels = {"model": MODEL_NAME, "endpoint": "/v1/completions"}
        assert srv.metric("slm_request_errors_total", {**labels, "error": "timeout"}) == 1
        assert srv.metric("slm_request_finish_total", {**labels, "finish_reason": "timeout"}) == 1


def test_a_stream_over_the_timeout_ends_with_an_error_event(tiny_engine, tiny_model_dir):
    settings = settings_for(
        tiny_model_dir, request_timeout_seconds=0.5, fault_injection=True, fault_latency_seconds=5.0
    )
    with serve(tiny_engine, settings) as srv:
        r = srv.client.post("/v1/completions", json={**GEN, "prompt": "x", "max_tokens": 2, "stream": True})
        assert r.status_code == 200  # the headers were sent before the deadline passed
        frames = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"type":"timeout_error"' in frames[-2]
        assert frames[-1] == "data: [DONE]"


def test_a_model_failure_is_500_counted_and_logged_with_the_request_id(tiny_engine, tiny_model_dir, json_records):
    settings = settings_for(tiny_model_dir, fault_injection=True, fault_error_rate=1.0)
    with serve(tiny_engine, settings) as srv:
        r = srv.client.post("/generate", json={"prompt": "x", "max_tokens": 2}, headers={"x-request-id": "req-500"})
        assert r.status_code == 500
        assert "generation failed" in r.json()["error"]["message"]
        labels = {"model": MODEL_NAME, "endpoint": "/generate"}
        assert srv.metric("slm_request_errors_total", {**labels, "error": "model_error"}) == 1
        assert srv.metric("api_requests_total", {"endpoint": "/generate", "status": "500"}) == 1
        srv.client.app.state.service.faults.error_rate = 0.0
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    errors = json_records("error")
    assert len(errors) == 1
    assert errors[0]["request_id"] == "req-500"
    assert "InjectedFault" in errors[0]["exception.stacktrace"]
    request_line = next(d for d in json_records("request") if d["request_id"] == "req-500")
    assert request_line["http.response.status_code"] == 500
    assert request_line["error.type"] == "model_error"


def test_beyond_the_queue_requests_get_429_with_retry_after(tiny_engine, tiny_model_dir):
    settings = one_slot_settings(tiny_model_dir)
    with serve(tiny_engine, settings) as srv:
        statuses: list[int] = []
        headers: list[dict] = []
        barrier = threading.Barrier(3)

        def call():
            barrier.wait()
            r = srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1})
            statuses.append(r.status_code)
            headers.append(dict(r.headers))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200, 429, 429]
        rejected = [h for h, s in zip(headers, statuses, strict=True) if s == 429]
        assert all(int(h["retry-after"]) >= 1 for h in rejected)
        labels = {"model": MODEL_NAME, "endpoint": "/generate"}
        assert srv.metric("slm_request_errors_total", {**labels, "error": "overloaded"}) == 2


def test_a_request_that_waits_too_long_in_the_queue_is_504(tiny_engine, tiny_model_dir):
    settings = settings_for(
        tiny_model_dir,
        max_concurrent_requests=1,
        max_queued_requests=4,
        request_timeout_seconds=3.0,  # the first fits (2 s + one token); the next would end at 4 s or later
        fault_injection=True,
        fault_latency_seconds=2.0,
    )
    with serve(tiny_engine, settings) as srv:
        statuses: list[int] = []
        barrier = threading.Barrier(3)

        def call():
            barrier.wait()
            statuses.append(srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 504 in statuses and 200 in statuses


def test_fault_injection_cannot_be_switched_on_without_opting_in(server):
    with pytest.raises(ValueError, match="fault_injection"):
        Settings(fault_error_rate=0.5)
    with pytest.raises(ValueError, match="fault_injection"):
        Settings(fault_admin_api=True, fault_injection=False)
    assert server.client.put("/admin/faults", json={"error_rate": 1.0}).status_code == 404
    assert server.client.post("/generate", json={"prompt": "x", "max_tokens": 1, "fault": 1}).status_code == 422


def test_the_operators_switch_opts_in_to_the_admin_api(tiny_model_dir, monkeypatch):
    """SLM_FAULTS_ADMIN=true (the operator's spec.server.faultsAdmin) is itself the opt-in; the API it
    turns on is tested in test_admin."""
    monkeypatch.setenv("SLM_FAULTS_ADMIN", "true")
    settings = Settings(model=str(tiny_model_dir), served_model_name=MODEL_NAME)
    assert settings.fault_injection and settings.fault_admin_api
    assert (settings.admin_address, settings.admin_port) == ("127.0.0.1", 8001)


def test_integers_written_as_whole_numbers_are_taken(server):
    """JSON Schema's integers include 5.0; the server takes what its OpenAPI document allows."""
    r = server.client.post("/generate", json={"prompt": "x", "max_tokens": 5.0, "seed": 3.0, "temperature": 1})
    assert r.status_code == 200, r.text
    assert r.json()["output_tokens"] <= 5
