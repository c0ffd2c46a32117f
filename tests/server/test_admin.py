"""Fault injection's admin API: off by default, never on the serving port, behind a bearer token when
one is set, and visible in `slm_fault_injection_enabled` while it or any fault is on."""

from __future__ import annotations

import urllib.error

import httpx
import pytest

from slm_devtools.dataplane import FaultAdmin
from slm_server.settings import Settings

from .conftest import MODEL_NAME, free_port, serve, server_process, settings_for

TOKEN = "a-long-random-token-from-a-secret"


def _admin(port: int) -> str:
    return f"http://127.0.0.1:{port}/admin/faults"


def test_the_admin_api_listens_on_its_own_port_not_the_serving_one(tiny_engine, tiny_model_dir):
    port = free_port()
    with serve(tiny_engine, settings_for(tiny_model_dir, fault_admin_api=True, admin_port=port)) as srv:
        assert srv.client.put("/admin/faults", json={"error_rate": 1.0}).status_code == 404
        assert srv.client.post("/admin/faults", json={"errorRate": 1.0}).status_code == 404
        assert "/admin/faults" not in srv.client.get("/openapi.json").json()["paths"]

        assert httpx.get(_admin(port)).json() == {"error_rate": 0.0, "latency_seconds": 0.0, "degraded_rate": 0.0}
        r = httpx.post(_admin(port), json={"errorRate": 1.0, "addedLatencySeconds": 0.1})
        assert r.json() == {"error_rate": 1.0, "latency_seconds": 0.1, "degraded_rate": 0.0}
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 500
        httpx.put(_admin(port), json={"degraded_rate": 1.0})
        body = srv.client.post("/generate", json={"prompt": "Return the", "max_tokens": 20, "temperature": 0}).json()
        assert body["perplexity"] > 300  # uniformly sampled tokens are garbage to the model
        assert httpx.post(_admin(port), json={}).status_code == 200
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    with pytest.raises(httpx.ConnectError):  # the listener stops with the server
        httpx.get(_admin(port))


def test_the_admin_api_needs_the_bearer_token_when_one_is_set(tiny_engine, tiny_model_dir):
    port = free_port()
    settings = settings_for(tiny_model_dir, fault_admin_api=True, admin_port=port, admin_token=TOKEN)
    with serve(tiny_engine, settings) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.post(_admin(port), json={"errorRate": 1.0}, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert "SLM_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200  # unchanged
        r = httpx.post(_admin(port), json={"errorRate": 1.0}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 500


def test_an_admin_api_reachable_from_other_hosts_needs_a_token(tiny_model_dir):
    with pytest.raises(ValueError, match="SLM_ADMIN_TOKEN"):
        Settings(model=str(tiny_model_dir), fault_admin_api=True, admin_host="0.0.0.0")  # noqa: S104
    settings = Settings(model=str(tiny_model_dir), fault_admin_api=True, admin_host="0.0.0.0", admin_token=TOKEN)  # noqa: S104
    assert settings.admin_token is not None and TOKEN not in repr(settings)  # a secret: never printed


def test_the_admin_port_must_differ_from_the_serving_port(tiny_model_dir):
    with pytest.raises(ValueError, match="SLM_ADMIN_PORT"):
        Settings(model=str(tiny_model_dir), fault_admin_api=True, port=9000, admin_port=9000)


def test_the_fault_gauge_is_1_exactly_while_the_admin_api_or_a_fault_is_on(tiny_engine, tiny_model_dir):
    labels = {"model": MODEL_NAME}
    with serve(tiny_engine, settings_for(tiny_model_dir)) as srv:
        assert srv.metric("slm_fault_injection_enabled", labels) == 0
    with serve(tiny_engine, settings_for(tiny_model_dir, fault_injection=True)) as srv:  # allowed, none on
        assert srv.metric("slm_fault_injection_enabled", labels) == 0
    with serve(tiny_engine, settings_for(tiny_model_dir, fault_injection=True, fault_degraded_rate=0.1)) as srv:
        assert srv.metric("slm_fault_injection_enabled", labels) == 1
    port = free_port()
    with serve(tiny_engine, settings_for(tiny_model_dir, fault_admin_api=True, admin_port=port)) as srv:
        assert srv.metric("slm_fault_injection_enabled", labels) == 1  # no fault yet, but anyone local may set one
        httpx.post(_admin(port), json={"errorRate": 0.5})
        httpx.post(_admin(port), json={})
        assert srv.metric("slm_fault_injection_enabled", labels) == 1


def test_the_admin_listener_is_on_loopback_by_default_the_servers_own_when_it_serves_on_one():
    """Several servers on one machine, each on its own loopback address (the local pods of the data
    plane), each get their admin listener on that address, not all on 127.0.0.1."""
    assert Settings(fault_admin_api=True).admin_address == "127.0.0.1"  # serving on 0.0.0.0: a pod
    assert Settings(fault_admin_api=True, host="127.3.4.5").admin_address == "127.3.4.5"
    assert Settings(fault_admin_api=True, host="10.0.0.7").admin_address == "127.0.0.1"


def test_the_devtools_switch_sets_faults_through_the_admin_port_and_token(tiny_model_dir, tmp_path):
    """slm_devtools' FaultAdmin (what the demo and the alert tests call) reaches a real `slm-server`
    started as the operator starts it (SLM_FAULTS_ADMIN, a token from a Secret) on its admin port."""
    port = free_port()
    env = {"SLM_FAULTS_ADMIN": "true", "SLM_ADMIN_PORT": str(port), "SLM_ADMIN_TOKEN": TOKEN}
    with server_process(tiny_model_dir, tmp_path, env) as proc:
        serving = int(proc.base_url.rsplit(":", 1)[1])
        admin = FaultAdmin.of(address="127.0.0.1", port=serving, env=env)
        assert admin.url == f"http://127.0.0.1:{port}/admin/faults"
        admin.send({"errorRate": 1.0, "addedLatencySeconds": 0, "degradedOutput": False})
        assert httpx.post(f"{proc.base_url}/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 500
        without_token = FaultAdmin.of(address="127.0.0.1", port=serving, env={**env, "SLM_ADMIN_TOKEN": ""})
        with pytest.raises(urllib.error.HTTPError) as refused:
            without_token.send({"errorRate": 0.0})
        assert refused.value.code == 401
    assert FaultAdmin.of(address="127.9.0.1", port=8000, env={}).url == "http://127.9.0.1:8001/admin/faults"
