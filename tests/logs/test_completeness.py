"""Completeness: what the real server writes reaches the log store, queryable by namespace and
SLMDeployment, with every field; nothing of the prompts or outputs does under the default policy.

The server runs with the environment of the pod the operator renders, its stdout in a CRI file where
the kubelet's runtime would write it; the chart's collector (its rendered configuration) ships it to
the chart's VictoriaLogs. The pod is registered in the real API server, from which the collector's
k8sattributes takes the node and the `slm.dev/deployment` label.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from slm_devtools.logplane import (
    LogPlane,
    ServerPod,
    deployment_log_query,
    format_entries,
    server_pod_env,
    sha256_hex,
    wait_for_entries,
)
from tests.logs.conftest import Pod

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane, pytest.mark.slow]

# Prompts no model output or log field would contain by chance: any of them in the store is a leak.
PROMPTS = [
    "Quillfeather zebra 7391 recites the marmalade ledger",
    "Cobalt-hinged lighthouse 4402 forgets its violin",
    "Ostrich parliament 9917 annotates a tangerine sonnet",
    "Basalt umbrella 2286 negotiates with the tide clock",
    "Velvet abacus 6650 hums beneath the glacier library",
    "Turquoise locksmith 3078 borrows a paper comet",
]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
DEPLOYMENT = "phi-logs"
SPEC: dict[str, Any] = {
    "model": {"name": "tiny"},
    "resources": {"gpus": 0},
    # One generation at a time and no queue, so two at once overload it; the faults admin API slows one.
    "server": {"maxConcurrentRequests": 1, "maxQueue": 0, "faultsAdmin": True},
}


def _same_value(written: Any, stored: str | None) -> bool:
    """Whether VictoriaLogs' text for a field is the value the server wrote: numbers as numbers,
    lists and objects as JSON, null as an absent field."""
    if written is None:
        return stored in (None, "")
    if stored is None:
        return False
    if isinstance(written, bool):
        return stored == ("true" if written else "false")
    if isinstance(written, int | float):
        return math.isclose(float(stored), float(written), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(written, list | dict):
        return bool(json.loads(stored) == written)
    return stored == str(written)


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def served(plane: LogPlane, new_pod: Any, tiny_model_dir: Path, tmp_path: Path) -> Any:
    """The real server as the pod's `server` container, started; stopped (SIGTERM) by the test or at the end."""
    pod: Pod = new_pod(DEPLOYMENT, SPEC)
    env = server_pod_env(pod.server_container, model_dir=tiny_model_dir, served_name="tiny", workdir=tmp_path / "pod")
    server = ServerPod(pod.logs(plane), env, tmp_path / "pod").start()
    yield pod, server
    server.stop()


def test_every_request_line_is_in_the_store_with_every_field_and_no_prompt_or_output(
    plane: LogPlane, served: Any
) -> None:
    pod, server = served
    assert plane.store is not None and plane.collector is not None
    outputs: list[str] = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for index, prompt in enumerate(PROMPTS):
            headers = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"} if index == 0 else {}
            if index % 2 == 0:
                response = client.post("/v1/completions", headers=headers, json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
                response.raise_for_status()
                outputs.append(response.json()["choices"][0]["text"])
            else:
                response = client.post("/v1/chat/completions", headers=headers, json={
                    "model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                    "temperature": 0, "ignore_eos": True})
                response.raise_for_status()
                outputs.append(response.json()["choices"][0]["message"]["content"])
        # An overload: two generations at once, each slowed by 3 s, on one slot without a queue.
        server.faults().send({"addedLatencySeconds": 3})
        body = {"model": "tiny", "prompt": "hold", "max_tokens": 2, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/completions", json=body), "ab"))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 429]
        server.faults().send({"addedLatencySeconds": 0})
    server.stop()  # SIGTERM, as the kubelet stops the container: the shutdown lines follow

    written = [r for r in server.records() if r.get("event") == "request"]
    # The corpus, the one served and the one refused at once (the fault settings go to the admin
    # listener, which serves no users and writes no request line).
    assert len(written) == len(PROMPTS) + 2
    selector = f'k8s.namespace.name:="{pod.namespace}" slm.deployment:="{DEPLOYMENT}"'
    stored = wait_for_entries(plane.store, f"{selector} event:=request", len(written), timeout=120,
                              check=plane.collector.proc.check_running)  # type: ignore[union-attr]
    by_id = {entry["request_id"]: entry for entry in stored}
    assert len(stored) == len(written) == len(by_id), "each request line once"

    # Every field the server wrote, under the name it wrote it, with its value.
    for line in written:
        entry = by_id[line["request_id"]]
        assert entry["_msg"] == line["message"] == "request"
        assert _time(entry["_time"]) == _time(line["timestamp"])
        assert entry["severity_text"] == line["level"]
        for name, value in line.items():
            if name in ("message", "timestamp", "level"):
                continue
            assert _same_value(value, entry.get(name)), (name, value, entry.get(name))
        # Kubernetes metadata: from the file's path and from the API server.
        assert entry["k8s.namespace.name"] == pod.namespace
        assert entry["k8s.pod.name"] == pod.name
        assert entry["k8s.pod.uid"] == pod.uid
        assert entry["k8s.container.name"] == "server"
        assert entry["k8s.node.name"] == plane.node
        assert entry["slm.deployment"] == DEPLOYMENT

    first = next(e for e in stored if e.get("trace_id"))
    assert (first["trace_id"], first["span_id"]) == (TRACE_ID, SPAN_ID)
    assert first["http.route"] == "/v1/completions"
    assert first["http.response.status_code"] == "200"
    assert first["gen_ai.request.model"] == "tiny"
    assert first["gen_ai.usage.output_tokens"] == "12"
    assert first["severity_number"] == "9"  # INFO
    keyed = first["gen_ai.output.hmac_sha256"]  # keyed: not the plain sha256 anyone could recompute
    assert len(keyed) == 64 and set(keyed) <= set("0123456789abcdef") and keyed != sha256_hex(outputs[0])
    refused_entry = next(e for e in stored if e["http.response.status_code"] == "429")
    assert refused_entry["error.type"] == "overloaded"

    # System events: start, model loaded, overload, shutdown (the shutdown line is the pod's last: the
    # request lines above can be in the store before it is).
    events = wait_for_entries(plane.store, f"{selector} event:in(startup, model_loaded, overloaded, shutdown)", 4,
                              timeout=60, check=plane.collector.proc.check_running)  # type: ignore[union-attr]
    assert {e["event"] for e in events} == {"startup", "model_loaded", "overloaded", "shutdown"}
    overloaded = next(e for e in events if e["event"] == "overloaded")
    assert (overloaded["severity_text"], overloaded["severity_number"]) == ("warning", "13")  # WARN

    # What the demo prints beside an alert: the query of the deployment's refused or failed requests, and its answer.
    shown = deployment_log_query(plane.store, pod.namespace, DEPLOYMENT, where="http.response.status_code:>=400")
    assert shown.query == (f'_time:15m k8s.namespace.name:="{pod.namespace}" slm.deployment:="{DEPLOYMENT}" '
                           "http.response.status_code:>=400 | sort by (_time desc) | limit 20")
    assert [e["request_id"] for e in shown.entries] == [refused_entry["request_id"]]
    assert "error.type=overloaded" in format_entries(shown.entries)

    # The default output policy (hash): no prompt and no output text anywhere in the store.
    everything = json.dumps(plane.store.query("*"))
    assert len(outputs) == len(PROMPTS) and all(len(text) >= 12 for text in outputs)
    for text in [*PROMPTS, *outputs]:
        assert text not in everything
    for word in ("Quillfeather", "marmalade", "tangerine", "glacier"):
        assert word not in everything


def test_a_line_that_is_not_json_is_kept_as_plain_text(plane: LogPlane, new_pod: Any) -> None:
    """A traceback printed by a library, a half-written object: shipped as their text, never dropped."""
    assert plane.store is not None
    pod: Pod = new_pod("plain-text")
    logs = pod.logs(plane)
    raw = [
        "Traceback (most recent call last):",
        '{"level": "info", "message": "cut off',
        "WARNING: something printed without the logger",
    ]
    for line in raw:
        logs.write(line, stream="stderr")
    logs.write('{"level": "info", "logger": "t", "message": "after", "event": "startup"}')
    entries = wait_for_entries(plane.store, f'k8s.pod.name:="{pod.name}"', 4, timeout=60,
                               check=plane.collector.proc.check_running)  # type: ignore[union-attr]
    messages = sorted(e["_msg"] for e in entries)
    assert messages == sorted([*raw, "after"])
    for entry in entries:
        assert entry["slm.deployment"] == "plain-text"
        assert entry["k8s.namespace.name"] == pod.namespace
    plain = [e for e in entries if e["_msg"] in raw]
    assert all(e["log.iostream"] == "stderr" for e in plain)
    assert {(e["severity_text"], e["severity_number"]) for e in plain} == {("Unspecified", "0")}
