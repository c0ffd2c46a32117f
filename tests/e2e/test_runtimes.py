"""Each third-party runtime's example (examples/<runtime>.yaml), applied with kubectl, reaches Ready; its
children carry that runtime's flags; its pods' containers run here with the pods' own arguments.

How Ready is reached, and what it proves:
- On the control plane: the real API server (the CRD's schema and CEL rules, restricted Pod Security
  admission), scheduler and Deployment controller. KWOK plays the kubelet: it marks a scheduled pod Running
  and Ready and runs nothing. The SLMDeployment's Ready=True therefore says: accepted, rendered, admitted,
  scheduled on nodes with the GPUs asked for.
- Then the containers of every pod run here (slm_devtools.localpods.LocalKubelet, the kubelet stand-in) with
  the pod's own args and environment, and the test waits for each container's own readiness probe:
  * llamacpp: the REAL llama-server (built by `make deps` from the pinned llama.cpp) loads the tiny model the
    project converts to GGUF, put in the example's claim under the example's file name, and the REAL sidecar
    (`python -m slm_sidecar`) fronts it; a completion goes through the sidecar, and llama-server's own
    /metrics answers on the runtime port the ServiceMonitor scrapes.
  * vllm, sglang, tgi cannot run here (GPU images). Their runtime container is a STAND-IN
    (slm_devtools.standin): a small HTTP process that listens where the rendered flags say and answers the
    runtime's health path and /v1/models — not the runtime. With the real sidecar in front of it, it proves
    the pod's ports, probes and the sidecar's forwarding. The flags themselves are judged by the runtimes'
    own parsers and launcher reference in tests/runtimes (which read these same examples).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from slm_devtools.cluster import FAKE_NODE_SELECTOR, FAKE_NODE_TOLERATION, ClusterBase, wait_for
from slm_devtools.dataplane import create_model_volume
from slm_devtools.gguf import ensure_tiny_gguf
from slm_devtools.localpods import LocalKubelet, LocalPod
from slm_devtools.standin import STAND_INS
from tests.operator.process import REPO, OperatorProcess, install_crd

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

EXAMPLES = REPO / "examples"

# What each example's runtime container must run with: written out here, not computed by the operator's code.
ANY = "0.0.0.0"  # noqa: S104 - the address the runtimes are told to listen on inside the pod
EXPECTED_ARGS = {
    "vllm": [
        "meta-llama/Llama-3.2-1B-Instruct", "--host", ANY, "--port", "8080",
        "--served-model-name", "meta-llama/Llama-3.2-1B-Instruct", "--revision", "main", "--dtype", "bfloat16",
        "--max-model-len", "8192", "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", "0.85", "--enable-prefix-caching", "--max-num-seqs", "64",
    ],
    "sglang": [
        "--model-path", "Qwen/Qwen2.5-3B-Instruct", "--host", ANY, "--port", "8080",
        "--served-model-name", "Qwen/Qwen2.5-3B-Instruct", "--revision", "main", "--dtype", "bfloat16",
        "--context-length", "16384", "--tp-size", "2", "--enable-metrics",
        "--mem-fraction-static", "0.8", "--chunked-prefill-size", "4096",
    ],
    "tgi": [
        "--model-id", "/data", "--dtype", "float16", "--max-total-tokens", "4096", "--num-shard", "1",
        "--hostname", ANY, "--port", "8080", "--prometheus-port", "9000",
        "--huggingface-hub-cache", "/tmp/huggingface/hub", "--max-concurrent-requests", "128",
    ],
    "llamacpp": [
        "--model", "/data/qwen2.5-0.5b-instruct-q4_k_m.gguf", "--host", ANY, "--port", "8080",
        "--alias", "qwen2.5-0.5b", "--ctx-size", "4096", "--metrics", "--threads", "4", "--parallel", "2",
    ],
}
EXPECTED_IMAGES = {
    "vllm": "docker.io/vllm/vllm-openai:v0.34.0",
    "sglang": "docker.io/lmsysorg/sglang:v0.5.23",
    "tgi": "ghcr.io/huggingface/text-generation-inference:3.3.7",
    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server-b11312",  # gpus: 0, the CPU build
}
SIDECAR_IMAGE = "registry.example/slm-sidecar:test"


@pytest.fixture(scope="module")
def operator_process(cluster: ClusterBase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator (python -m slm_operator) watching all namespaces, resync every 3 s."""
    install_crd(cluster)
    cluster.install_prometheus_operator_crds()
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator"), resync_seconds=3,
                              extra_env={"SLM_OPERATOR_SIDECAR_IMAGE": SIDECAR_IMAGE})
    process.start()
    yield process
    process.stop()


def example(runtime: str) -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / f"{runtime}.yaml").read_text())
    assert isinstance(obj, dict)
    return obj


def apply_on_fake_nodes(cluster: ClusterBase, namespace: str, obj: dict[str, Any]) -> str:
    spec = obj["spec"]
    spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **FAKE_NODE_SELECTOR}
    spec["tolerations"] = [*spec.get("tolerations", []), FAKE_NODE_TOLERATION]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    return str(obj["metadata"]["name"])


def slmd(cluster: ClusterBase, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "slmd", name, "-n", namespace))


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((dict(c) for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), {})


def running_pods(cluster: ClusterBase, namespace: str, name: str, count: int) -> list[dict[str, Any]]:
    """The Deployment's `count` pods, once KWOK has made each Running with an IP."""
    found: list[dict[str, Any]] = []

    def all_running() -> bool:
        nonlocal found
        items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")
        found = [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")
                 and p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        return len(found) == count

    wait_for(f"{count} running pods of {namespace}/{name}", all_running, timeout=90)
    return found


def prepare(cluster: ClusterBase, namespace: str, runtime: str, obj: dict[str, Any], workdir: Path) -> dict[str, Path]:
    """What the example expects to find in its namespace (a token Secret, the `models` claim); the claims'
    local directories."""
    model = obj["spec"]["model"]
    if "hfTokenSecretRef" in model:
        ref = model["hfTokenSecretRef"]
        cluster.kubectl("create", "secret", "generic", ref["name"], "-n", namespace,
                        f"--from-literal={ref['key']}=hf_not_a_real_token")
    if "source" not in model:
        return {}
    claim = model["source"]["pvc"]["claimName"]
    create_model_volume(cluster, namespace, claim=claim)
    directory = workdir / "claims" / claim
    (directory / model["source"]["pvc"]["subPath"]).mkdir(parents=True, exist_ok=True)
    if runtime == "llamacpp":
        # The example's file, here the tiny model in GGUF (a 0.5B model cannot be downloaded here).
        (directory / model["source"]["pvc"]["subPath"] / model["file"]).symlink_to(ensure_tiny_gguf(log=print))
    return {claim: directory}


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "tgi", "llamacpp"])
def test_example_reaches_ready_with_the_runtimes_flags_and_its_containers_serve(
        runtime: str, cluster: ClusterBase, operator_process: OperatorProcess, namespace: str,
        tmp_path: Path) -> None:
    obj = example(runtime)
    claims = prepare(cluster, namespace, runtime, obj, tmp_path)
    started = time.monotonic()
    name = apply_on_fake_nodes(cluster, namespace, obj)
    replicas = int(obj["spec"].get("replicas", 1))

    def ready() -> bool:
        return condition(slmd(cluster, namespace, name), "Ready").get("status") == "True"

    wait_for(f"{namespace}/{name} Ready", ready, timeout=120,
             on_timeout=lambda: json.dumps(slmd(cluster, namespace, name).get("status"), indent=1))
    status = slmd(cluster, namespace, name)["status"]
    assert (status["phase"], status["readyReplicas"]) == ("Ready", replicas)
    assert condition({"status": status}, "MonitoringReady")["reason"] == "MonitorsApplied"

    # The children carry the runtime: its container with its flags and image, the sidecar on the pod's port.
    deployment = cluster.kubectl_json("get", "deployment", name, "-n", namespace)
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert sorted(containers) == sorted([runtime, "slm-sidecar"])
    assert containers[runtime]["args"] == EXPECTED_ARGS[runtime]
    assert containers[runtime]["image"] == EXPECTED_IMAGES[runtime]
    assert [p["name"] for p in containers["slm-sidecar"]["ports"]] == ["http"]
    assert containers["slm-sidecar"]["image"] == SIDECAR_IMAGE
    service = cluster.kubectl_json("get", "service", name, "-n", namespace)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000), ("runtime", 8080)]
    monitor = cluster.kubectl_json("get", "servicemonitor", name, "-n", namespace)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http", "runtime"]

    # The containers, run here with the pods' own arguments: each container's readiness probe passes.
    kubelet = LocalKubelet(cluster, tmp_path / "pods", claims=claims, programs=STAND_INS)
    with kubelet.running():
        pods: list[LocalPod] = [kubelet.run(pod, timeout=180)
                                for pod in running_pods(cluster, namespace, name, replicas)]
        served = obj["spec"]["model"].get("servedName", obj["spec"]["model"]["name"])
        for pod in pods:
            models = httpx.get(pod.url("http", "/v1/models"), timeout=10).json()  # through the sidecar
            # TGI has no served-name flag: it answers its --model-id, /data in the pod (here, the claim's directory).
            expected = pod.host_path(runtime, "/data") if runtime == "tgi" else served
            assert [m["id"] for m in models["data"]] == [expected]
            assert httpx.get(pod.url("http", "/readyz"), timeout=10).status_code == 200
        if runtime == "llamacpp":
            pod = pods[0]
            reply = httpx.post(pod.url("http", "/v1/completions"), timeout=120, json={
                "model": served, "prompt": "The module provides", "max_tokens": 4, "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
            runtime_metrics = httpx.get(pod.url("runtime", "/metrics"), timeout=10).text
            assert "llamacpp:tokens_predicted_total" in runtime_metrics
            sidecar_metrics = httpx.get(pod.url("http", "/metrics"), timeout=10).text
            assert 'api_requests_total{endpoint="/v1/completions"' in sidecar_metrics
    print(f"{runtime}: apply -> Ready and containers ready: {time.monotonic() - started:.1f}s")


def test_alerts_a_runtime_cannot_support_are_left_out_and_said_once(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str, tmp_path: Path) -> None:
    """TGI has no KV-cache gauge and never preempts: those two alerts are not in its PrometheusRule, and the
    SLMDeployment's AlertsUnsupported condition and one Event say so; vLLM's rule has both, with the
    example's thresholds."""
    tgi = example("tgi")
    prepare(cluster, namespace, "tgi", tgi, tmp_path)
    name = apply_on_fake_nodes(cluster, namespace, tgi)

    def unsupported() -> bool:
        return condition(slmd(cluster, namespace, name), "AlertsUnsupported").get("status") == "True"

    wait_for(f"{namespace}/{name} AlertsUnsupported", unsupported, timeout=60,
             on_timeout=lambda: json.dumps(slmd(cluster, namespace, name).get("status"), indent=1))
    message = condition(slmd(cluster, namespace, name), "AlertsUnsupported")["message"]
    assert "SLMKVCacheSaturated: no KV-cache gauge" in message
    assert "SLMRequestsPreempted: TGI's router does not preempt" in message
    alerts = {r.get("alert") for g in cluster.kubectl_json("get", "prometheusrule", name, "-n", namespace)["spec"][
        "groups"] for r in g["rules"]}
    assert "SLMKVCacheSaturated" not in alerts and "SLMRequestsPreempted" not in alerts
    assert "SLMHighErrorRate" in alerts  # TGI counts failed requests

    def events() -> list[dict[str, Any]]:
        return [e for e in cluster.kubectl_json(
            "get", "events", "-n", namespace,
            "--field-selector", f"involvedObject.name={name},involvedObject.kind=SLMDeployment")["items"]
            if e["reason"] == "RuntimeLacksSignals"]

    def all_events() -> str:
        items = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
        return json.dumps([(e["reason"], e.get("count"), e["message"][:80]) for e in items], indent=1)

    wait_for("the RuntimeLacksSignals event", lambda: len(events()) == 1, timeout=30, on_timeout=all_events)
    # Said once: two more resyncs of every SLMDeployment add no second Event (nor a count on the first).
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("two more resyncs", lambda: operator_process.sum_of("slm_operator_reconciles_total",
                                                                  trigger="resync") >= resyncs + 2, timeout=30)
    assert [e.get("count", 1) for e in events()] == [1]

    vllm = example("vllm")
    prepare(cluster, namespace, "vllm", vllm, tmp_path)
    vllm_name = apply_on_fake_nodes(cluster, namespace, vllm)

    def vllm_rules() -> dict[str, dict[str, Any]]:
        found = cluster.kubectl("get", "prometheusrule", vllm_name, "-n", namespace, "-o", "json", check=False)
        if found.returncode != 0:
            return {}
        return {r["alert"]: r for g in json.loads(found.stdout)["spec"]["groups"] for r in g["rules"] if "alert" in r}

    wait_for("vLLM's PrometheusRule", lambda: "SLMKVCacheSaturated" in vllm_rules(), timeout=60)
    rules = vllm_rules()
    assert rules["SLMKVCacheSaturated"]["expr"] == (
        f'slm:kv_cache_usage:percent{{namespace="{namespace}",job="{vllm_name}"}} > 90')
    assert rules["SLMRequestsPreempted"]["expr"] == (
        f'slm:preemptions:rate5m{{namespace="{namespace}",job="{vllm_name}"}} > 0.1')
    assert (rules["SLMKVCacheSaturated"]["for"], rules["SLMKVCacheSaturated"]["labels"]["severity"]) == (
        "10m", "warning")


def minimal(name: str, **spec: Any) -> str:
    resources = {"gpus": 0, "modelCacheSizeLimit": "1Gi", "tmpSizeLimit": "256Mi"}
    return json.dumps({"apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": name},
                       "spec": {"model": {"name": "org/model"}, "resources": resources,
                                "nodeSelector": FAKE_NODE_SELECTOR, "tolerations": [FAKE_NODE_TOLERATION], **spec}})


@pytest.mark.parametrize(("spec", "message"), [
    ({"runtimeArgs": ["--threads", "2"]}, "spec.runtimeArgs is for the third-party runtimes"),
    ({"runtime": "llamacpp", "model": {"name": "m", "source": {"pvc": {"claimName": "models"}}}},
     "spec.model.file must name the .gguf file inside spec.model.source for runtime llamacpp"),
    ({"runtime": "tgi", "model": {"name": "m", "dtype": "float32"}},
     "spec.model.dtype float32 is not supported by runtime tgi"),
    ({"runtime": "vllm", "model": {"name": "m", "file": "/etc/passwd"}}, "spec.model.file must be a relative path"),
], ids=["args-for-builtin", "llamacpp-without-file", "tgi-float32", "absolute-file"])
def test_the_api_server_refuses_a_runtime_spec_it_cannot_run(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str, spec: dict[str, Any],
        message: str) -> None:
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("bad", **spec), check=False)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def test_a_flag_the_operator_owns_is_reported_as_invalid_spec_without_a_retry_loop(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    """The CRD cannot know every runtime's flags; the operator refuses `--port` in runtimeArgs, says why in the
    Ready condition, creates nothing and keeps reconciling without errors."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=minimal("owned", runtime="vllm", runtimeArgs=["--max-num-seqs", "8", "--port", "9000"]))

    def invalid() -> bool:
        ready = condition(slmd(cluster, namespace, "owned"), "Ready")
        return ready.get("reason") == "InvalidSpec" and "runtimeArgs may not set --port" in ready.get("message", "")

    wait_for(f"{namespace}/owned InvalidSpec", invalid, timeout=60,
             on_timeout=lambda: json.dumps(slmd(cluster, namespace, "owned").get("status"), indent=1))
    errors = operator_process.sum_of("slm_operator_reconcile_errors_total")
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("two more resyncs", lambda: operator_process.sum_of("slm_operator_reconciles_total",
                                                                  trigger="resync") >= resyncs + 2, timeout=30)
    assert operator_process.sum_of("slm_operator_reconcile_errors_total") == errors
    assert cluster.kubectl("get", "deployment", "owned", "-n", namespace, check=False).returncode != 0
