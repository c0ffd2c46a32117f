"""JSON log lines: one per API request with the model fields, outputs under the policy, system events."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from slm_server.logs import BATCH_LINES, JsonFormatter, JsonLines, configure_logging, parse_traceparent
from slm_server.settings import Settings

from .conftest import MODEL_NAME, one_slot_settings, serve, settings_for, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

REQUEST_FIELDS = {
    "timestamp", "level", "logger", "message", "event", "request_id", "http.request.method", "http.route",
    "http.response.status_code", "latency_s", "trace_id", "span_id", "gen_ai.operation.name", "gen_ai.request.model",
    "gen_ai.response.model", "gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.response.finish_reasons",
    "gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token", "slm.perplexity", "slm.queue_time_s",
    "slm.stream", "gen_ai.output.length", "gen_ai.output.hmac_sha256",
}  # fmt: skip


def _generate(client, **extra):
    return client.post(
        "/generate",
        json={"prompt": "Return the number", "max_tokens": 8, "temperature": 0, **extra},
        headers={"traceparent": TRACEPARENT},
    )


def test_a_request_line_has_every_field(server, json_records):
    r = _generate(server.client)
    body = r.json()
    line = next(d for d in json_records("request") if d["request_id"] == body["id"])
    assert set(line) >= REQUEST_FIELDS, REQUEST_FIELDS - set(line)
    assert line["trace_id"] == TRACE_ID
    assert line["http.route"] == "/generate"
    assert line["http.response.status_code"] == 200
    assert line["gen_ai.request.model"] == MODEL_NAME
    assert line["gen_ai.usage.output_tokens"] == body["output_tokens"]
    assert line["gen_ai.response.finish_reasons"] == [body["finish_reason"]]
    assert line["slm.perplexity"] == pytest.approx(body["perplexity"])
    assert len(line["gen_ai.output.hmac_sha256"]) == 64
    assert line["gen_ai.output.hmac_sha256"] != hashlib.sha256(body["text"].encode()).hexdigest()  # keyed
    assert line["gen_ai.output.length"] == len(body["text"])
    assert "gen_ai.output.text" not in line  # the default policy never writes the text


def test_a_request_line_has_the_seed_and_penalties_a_request_gave(server, json_records):
    given = _generate(server.client, seed=42, presence_penalty=0.5, frequency_penalty=-0.25).json()
    left_out = _generate(server.client).json()
    lines = {d["request_id"]: d for d in json_records("request")}
    line = lines[given["id"]]
    assert (line["gen_ai.request.seed"], line["gen_ai.request.presence_penalty"]) == (42, 0.5)
    assert line["gen_ai.request.frequency_penalty"] == -0.25
    assert not {"gen_ai.request.seed", "gen_ai.request.presence_penalty", "gen_ai.request.frequency_penalty"} & set(
        lines[left_out["id"]]
    )


def test_streamed_requests_are_logged_with_their_generation_fields(server, json_records):
    r = server.client.post(
        "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True},
    )
    line = next(d for d in json_records("request") if d["request_id"] == r.headers["x-request-id"])
    assert line["slm.stream"] is True
    assert line["gen_ai.operation.name"] == "chat"
    assert line["gen_ai.usage.output_tokens"] >= 1
    assert "gen_ai.server.time_to_first_token" in line


def test_probes_are_not_logged_by_default_and_failures_are_errors(server, json_records):
    server.client.get("/healthz")
    server.client.post("/generate", json={})
    lines = json_records("request")
    assert all(d["http.route"] != "/healthz" for d in lines)
    invalid = [d for d in lines if d["http.response.status_code"] == 422]
    assert len(invalid) == 1 and invalid[0]["level"] == "info"


@pytest.mark.parametrize(
    ("policy", "expected", "absent"),
    [
        ("none", set(), {"gen_ai.output.length", "gen_ai.output.hmac_sha256", "gen_ai.output.text"}),
        ("hash", {"gen_ai.output.length", "gen_ai.output.hmac_sha256"}, {"gen_ai.output.text"}),
        ("truncated", {"gen_ai.output.text", "gen_ai.output.truncated"}, {"gen_ai.output.hmac_sha256"}),
        ("full", {"gen_ai.output.text"}, {"gen_ai.output.hmac_sha256", "gen_ai.output.truncated"}),
    ],
)
def test_output_log_policy(tiny_engine, tiny_model_dir, json_records, policy, expected, absent):
    settings = settings_for(tiny_model_dir, log_outputs=policy, log_truncate_chars=5)
    with serve(tiny_engine, settings) as srv:
        body = _generate(srv.client, max_tokens=20).json()
    line = next(d for d in json_records("request") if d["request_id"] == body["id"])
    assert expected <= set(line)
    assert not absent & set(line)
    if policy == "truncated":
        assert line["gen_ai.output.text"] == body["text"][:5]
    if policy == "full":
        assert line["gen_ai.output.text"] == body["text"]


def test_output_hashes_are_keyed_with_the_configured_key(tiny_engine, tiny_model_dir, json_records):
    """A short output ("yes", a number) hashed without a key is reversed by hashing guesses; keyed
    with HMAC-SHA256, only who holds the key can. The same key gives the same hash (comparable across
    replicas and restarts)."""
    key = "k" * 32
    hashes = []
    for _ in range(2):
        with serve(tiny_engine, settings_for(tiny_model_dir, output_hash_key=key)) as srv:
            body = _generate(srv.client).json()
        line = next(d for d in json_records("request") if d["request_id"] == body["id"])
        assert line["gen_ai.output.hmac_sha256"] == hmac.new(key.encode(), body["text"].encode(), "sha256").hexdigest()
        hashes.append(line["gen_ai.output.hmac_sha256"])
    assert hashes[0] == hashes[1]
    loaded = json_records("model_loaded")[-1]
    assert loaded["slm.output_hash"] == "hmac-sha256 keyed by SLM_OUTPUT_HASH_KEY"


def test_without_a_key_each_process_hashes_with_its_own_and_says_so(tiny_engine, tiny_model_dir, json_records):
    hashes = []
    for _ in range(2):
        with serve(tiny_engine, settings_for(tiny_model_dir, output_hash_key=None)) as srv:
            body = _generate(srv.client).json()  # greedy: the same output both times
        hashes.append(next(d for d in json_records("request") if d["request_id"] == body["id"]))
    assert hashes[0]["gen_ai.output.length"] == hashes[1]["gen_ai.output.length"]
    assert hashes[0]["gen_ai.output.hmac_sha256"] != hashes[1]["gen_ai.output.hmac_sha256"]
    loaded = json_records("model_loaded")[-1]
    assert "not comparable across restarts" in loaded["slm.output_hash"]


def test_output_sample_rate_zero_logs_no_output(tiny_engine, tiny_model_dir, json_records):
    with serve(tiny_engine, settings_for(tiny_model_dir, log_outputs="full", log_sample_rate=0.0)) as srv:
        body = _generate(srv.client).json()
    line = next(d for d in json_records("request") if d["request_id"] == body["id"])
    assert "gen_ai.output.text" not in line
    assert "gen_ai.usage.output_tokens" in line  # the request itself is always logged


def test_system_events_start_model_loaded_and_shutdown(tiny_engine, tiny_model_dir, json_records):
    with serve(tiny_engine, settings_for(tiny_model_dir)):
        pass
    assert len(json_records("startup")) == 1
    loaded = json_records("model_loaded")
    assert len(loaded) == 1
    assert loaded[0]["slm.load_seconds"] >= 0 and loaded[0]["slm.device"] == "cpu"
    assert len(json_records("shutdown")) == 2  # draining, then stopped


def test_overload_is_logged_once_per_burst(tiny_engine, tiny_model_dir, json_records):
    import threading

    settings = one_slot_settings(tiny_model_dir)
    with serve(tiny_engine, settings) as srv:
        threads = [
            threading.Thread(target=lambda: srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    overloaded = json_records("overloaded")
    assert len(overloaded) == 1
    assert "overloaded" in overloaded[0]["message"]


def test_formatter_writes_one_json_object_per_line_with_the_stack_trace():
    stream = io.StringIO()
    handler = configure_logging(Settings(), stream=stream)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("slm_server.test").exception("failed", extra={"fields": {"event": "error"}})
        logging.getLogger("uvicorn.error").info("Uvicorn running")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()  # writes what is still buffered
    lines = stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "error" and first["exception.type"] == "RuntimeError"
    assert "raise RuntimeError" in first["exception.stacktrace"]
    assert second["logger"] == "uvicorn.error" and second["message"] == "Uvicorn running"
    assert first["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, (TRACE_ID, "00f067aa0ba902b7")),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", (None, None)),
        ("garbage", (None, None)),
        ("00-xyz-00f067aa0ba902b7-01", (None, None)),
    ],
)
def test_traceparent_parsing(header, expected):
    assert parse_traceparent(header) == expected


def test_json_formatter_is_used_for_records_without_fields():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain %s", ("message",), None)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "plain message" and doc["level"] == "warning"


# --- the writer: batched, ordered, never blocking the request path on output -------------------------------------
def _docs(stream: io.BytesIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_buffered_lines_are_written_by_the_flusher_within_the_interval():
    stream = io.BytesIO()
    lines = JsonLines(stream, flush_interval=0.05)
    try:
        lines.write({"timestamp": time.time(), "level": "info", "logger": "t", "message": "one"})
        assert stream.getvalue() == b""  # queued, not written by the caller
        docs = wait_for(lambda: _docs(stream))
        assert docs[0]["message"] == "one" and docs[0]["timestamp"].endswith("Z")
    finally:
        lines.close()


def test_an_urgent_line_is_written_at_once_after_the_lines_queued_before_it():
    stream = io.BytesIO()
    lines = JsonLines(stream, flush_interval=60)  # the flusher would not run during the test
    try:
        for i in range(3):
            lines.write({"timestamp": time.time(), "level": "info", "logger": "t", "message": f"info {i}"})
        lines.write({"timestamp": time.time(), "level": "error", "logger": "t", "message": "boom"}, urgent=True)
        assert [d["message"] for d in _docs(stream)] == ["info 0", "info 1", "info 2", "boom"]
    finally:
        lines.close()


def test_a_full_batch_is_written_by_the_writer_that_completes_it():
    stream = io.BytesIO()
    lines = JsonLines(stream, flush_interval=60)  # the flusher would not run during the test
    try:
        for i in range(BATCH_LINES - 1):
            lines.write({"timestamp": time.time(), "level": "info", "logger": "t", "message": f"line {i}"})
        assert stream.getvalue() == b""
        lines.write({"timestamp": time.time(), "level": "info", "logger": "t", "message": "last"})
        messages = [d["message"] for d in _docs(stream)]
        assert messages == [f"line {i}" for i in range(BATCH_LINES - 1)] + ["last"]
    finally:
        lines.close()


class _StuckStream(io.BytesIO):
    """stdout as a full pipe: the first write blocks until the test lets it through."""

    def __init__(self) -> None:
        super().__init__()
        self.writing, self.release = threading.Event(), threading.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if not self.writing.is_set():
            self.writing.set()
            self.release.wait(10)
        return super().write(data)


def test_a_writer_never_waits_for_a_flush_in_progress():
    stream = _StuckStream()
    lines = JsonLines(stream, flush_interval=0.05)
    try:
        lines.write({"timestamp": time.time(), "message": "first"})
        assert stream.writing.wait(5)  # the flusher thread is stuck writing it
        writer = threading.Thread(
            target=lambda: [lines.write({"timestamp": time.time(), "message": f"{i}"}) for i in range(BATCH_LINES * 2)]
        )
        writer.start()
        writer.join(5)
        assert not writer.is_alive()  # queued, not blocked behind the stuck write
    finally:
        stream.release.set()
        lines.close()
    assert [d["message"] for d in _docs(stream)] == ["first"] + [f"{i}" for i in range(BATCH_LINES * 2)]


def test_close_writes_what_is_left_and_bad_values_lose_nothing_else():
    stream = io.BytesIO()
    lines = JsonLines(stream, flush_interval=60)
    lines.write({"timestamp": time.time(), "message": "nan", "slm.perplexity": float("nan")})
    lines.write({"timestamp": time.time(), "message": "huge", "n": 1 << 70})  # beyond JSON's 64-bit integers
    lines.write({"timestamp": time.time(), "message": "path", "p": Path("/models/x")})
    lines.write({"timestamp": time.time(), "message": "key", 7: "seven"})  # a key that is not a string
    lines.close()
    docs = _docs(stream)
    assert docs[0]["slm.perplexity"] is None  # valid JSON, where json.dumps would write NaN
    assert docs[1]["level"] == "error" and "unloggable" in docs[1]["message"]
    assert docs[2]["p"] == "/models/x"
    assert docs[3]["7"] == "seven"


def test_request_lines_and_logging_lines_share_one_ordered_stream(server, json_records):
    logging.getLogger("slm_server.test").info("before", extra={"fields": {"event": "marker"}})
    body = _generate(server.client).json()
    logging.getLogger("slm_server.test").info("after", extra={"fields": {"event": "marker"}})
    docs = json_records()
    order = [d.get("message") for d in docs if d.get("event") == "marker" or d.get("request_id") == body["id"]]
    assert order == ["before", "request", "after"]


def test_a_server_error_request_line_is_written_without_waiting_for_the_flusher(tiny_engine, tiny_model_dir):
    stream = io.BytesIO()
    handler = configure_logging(Settings(log_flush_interval_seconds=10), stream=stream)
    try:
        with serve(tiny_engine, settings_for(tiny_model_dir, fault_injection=True, fault_error_rate=1.0)) as srv:
            r = srv.client.post("/generate", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 500
            lines = [d for d in _docs(stream) if d.get("event") == "request"]
            assert lines and lines[-1]["request_id"] == r.headers["x-request-id"] and lines[-1]["level"] == "error"
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
