"""Kube.request against a real HTTP server on loopback that answers as an overloaded or restarting API
server would: 429 with Retry-After, 5xx, a refused connection. The sleeps are recorded instead of slept."""

from __future__ import annotations

import email.utils
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from slm_operator.kube import Kube, RetryPolicy, tuned

Answer = tuple[int, dict[str, str]]  # status, headers


class Scripted(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: list[Answer] = []
        self.requests: list[str] = []


class Handler(http.server.BaseHTTPRequestHandler):
    server: Scripted

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.requests.append(f"{self.command} {self.path}")
        status, headers = self.server.answers.pop(0) if self.server.answers else (200, {})
        body = json.dumps({"kind": "Status", "code": status, "message": "scripted"} if status >= 400 else
                          {"kind": "ConfigMap", "metadata": {"name": "c"}}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PATCH = do_POST = do_DELETE = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Scripted]:
    scripted = Scripted()
    thread = threading.Thread(target=scripted.serve_forever, daemon=True)
    thread.start()
    yield scripted
    scripted.shutdown()
    scripted.server_close()


def kube_for(port: int, sleeps: list[float], **policy: Any) -> Kube:
    configuration = tuned(client.Configuration(host=f"http://127.0.0.1:{port}"))  # as load_config does
    return Kube(client.ApiClient(configuration), retry=RetryPolicy(**policy), sleep=sleeps.append)


def test_429_waits_as_long_as_retry_after_says(server: Scripted) -> None:
    sleeps: list[float] = []
    server.answers = [(429, {"Retry-After": "7"}), (429, {"Retry-After": "2"})]
    obj = kube_for(server.server_port, sleeps).get("ConfigMap", "ns", "c")
    assert obj == {"kind": "ConfigMap", "metadata": {"name": "c"}}
    assert sleeps == [7.0, 2.0] and len(server.requests) == 3


def test_retry_after_as_an_http_date_and_a_cap_on_absurd_values(server: Scripted) -> None:
    sleeps: list[float] = []
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    server.answers = [(429, {"Retry-After": in_ten}), (429, {"Retry-After": "86400"})]
    kube_for(server.server_port, sleeps, retry_after_cap_seconds=60).get("ConfigMap", "ns", "c")
    assert 8 <= sleeps[0] <= 10 and sleeps[1] == 60


def test_5xx_backs_off_exponentially_with_jitter_then_gives_up(server: Scripted) -> None:
    sleeps: list[float] = []
    server.answers = [(503, {})] * 5
    kube = kube_for(server.server_port, sleeps, attempts=5, base_seconds=1, cap_seconds=6)
    with pytest.raises(ApiException) as caught:
        kube.request("PATCH", "/api/v1/namespaces/ns/configmaps/c", body={})
    assert caught.value.status == 503 and len(server.requests) == 5
    ceilings = [1, 2, 4, 6]  # base * 2**retry, capped
    assert len(sleeps) == 4 and all(0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    many: list[float] = []
    for _ in range(20):
        server.answers = [(500, {}), (502, {})]
        kube_for(server.server_port, many, base_seconds=1).get("ConfigMap", "ns", "c")
    assert len(set(many)) > 30  # jittered: clients retrying together do not stay in step


def test_a_client_error_is_not_retried(server: Scripted) -> None:
    sleeps: list[float] = []
    server.answers = [(422, {})]
    with pytest.raises(ApiException) as caught:
        kube_for(server.server_port, sleeps).request("PATCH", "/api/v1/namespaces/ns/configmaps/c", body={})
    assert caught.value.status == 422 and sleeps == [] and len(server.requests) == 1


def test_a_refused_connection_is_retried_then_reported() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(ApiException) as caught:
        kube_for(port, sleeps, attempts=3).get("ConfigMap", "ns", "c")
    assert caught.value.status == 0 and len(sleeps) == 2
