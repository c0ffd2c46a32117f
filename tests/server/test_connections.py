"""What a client's connection can cost the server: a client that goes away stops its generation, the
connections are bounded, and a body that trickles in is cut off at the request's deadline. Through
uvicorn on a loopback port, configured as `slm-server` configures it."""

from __future__ import annotations

import json
import socket
import time

from .conftest import MODEL_NAME, live_server, settings_for, wait_for


def _post(path: str, body: bytes, length: int | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_a_client_that_goes_away_stops_its_non_streamed_generation(tiny_engine, tiny_model_dir):
    """The generation waits 60 s (injected latency, which a cancel ends at once); the client closes
    its connection after 0 s: the slot is free within seconds and the generation ends as `abort`."""
    settings = settings_for(tiny_model_dir, fault_injection=True, fault_latency_seconds=60, request_timeout_seconds=120)
    with live_server(tiny_engine, settings) as srv:
        in_flight = {"model": MODEL_NAME}
        sock = _connect(str(srv.client.base_url))
        sock.sendall(_post("/generate", json.dumps({"prompt": "x", "max_tokens": 4}).encode()))
        wait_for(lambda: srv.metric("slm_requests_in_flight", in_flight) == 1, 30)
        sock.close()
        wait_for(lambda: srv.metric("slm_requests_in_flight", in_flight) == 0, 15)
        labels = {"model": MODEL_NAME, "endpoint": "/generate"}
        assert srv.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) == 1
        assert srv.metric("slm_request_errors_total", {**labels, "error": "internal"}) == 0  # not an error of ours
        # The response nobody reads is counted as nginx logs it: 499, the client closed the request.
        wait_for(lambda: srv.metric("api_requests_total", {"endpoint": "/generate", "status": "499"}) == 1)
        assert srv.client.get("/healthz").status_code == 200


def test_connections_beyond_the_limit_get_503(tiny_engine, tiny_model_dir):
    """uvicorn's limit counts the open connections (idle keep-alive ones too) and the requests in progress."""
    with live_server(tiny_engine, settings_for(tiny_model_dir, max_connections=3)) as srv:
        srv.client.close()  # its keep-alive connection would count too
        url = str(srv.client.base_url)
        idle = [_connect(url), _connect(url)]
        try:

            def status() -> int:
                sock = _connect(url)
                try:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
                    return int(sock.recv(4096).split()[1])
                finally:
                    sock.close()

            wait_for(lambda: status() == 503, 15)  # once the loop has taken the two idle connections
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: status() == 200, 15)


def test_a_body_that_does_not_arrive_before_the_deadline_is_408(tiny_engine, tiny_model_dir):
    """A client that sends its headers and part of its body, then nothing (slow loris), holds the
    request until request_timeout_seconds, then gets 408; the server goes on serving."""
    with live_server(tiny_engine, settings_for(tiny_model_dir, request_timeout_seconds=1.0)) as srv:
        sock = _connect(str(srv.client.base_url))
        started = time.monotonic()
        sock.sendall(_post("/generate", b'{"prompt": "x", ', length=100))
        answer = sock.recv(65536)
        waited = time.monotonic() - started
        sock.close()
        assert answer.split()[1] == b"408", answer
        assert b"request_timeout_seconds" in answer
        assert 0.9 < waited < 10
        labels = {"endpoint": "/generate", "status": "408"}
        wait_for(lambda: srv.metric("api_requests_total", labels) == 1)
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200
