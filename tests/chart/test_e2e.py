"""The chart on a real API server: install, what its ServiceAccount may and may not do, the operator
running under exactly that identity, `helm test`, upgrade, and an uninstall that leaves nothing behind.

Runs against the `cluster` fixture (local control plane with KWOK nodes, or a kind cluster). Pods are
faked by KWOK there, so the operator itself runs as a local process authenticated with a token of the
chart's ServiceAccount: the RBAC it meets is the chart's, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools import tools
from slm_devtools.cluster import FAKE_NODE_SELECTOR, FAKE_NODE_TOLERATION, ClusterBase, free_port, wait_for
from tests.chart.chartlib import CHART, CI_VALUES, REPO_ROOT, render

pytestmark = pytest.mark.e2e

# Kinds the chart can create, namespaced and cluster-scoped (the "nothing left behind" check).
CHART_KINDS = (
    "deployments.apps,daemonsets.apps,services,serviceaccounts,configmaps,jobs.batch,pods,"
    "roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,"
    "networkpolicies.networking.k8s.io,servicemonitors.monitoring.coreos.com,"
    "prometheusrules.monitoring.coreos.com"
)
CLUSTER_KINDS = "clusterroles.rbac.authorization.k8s.io,clusterrolebindings.rbac.authorization.k8s.io"


class Release:
    def __init__(self, cluster: ClusterBase, name: str, namespace: str) -> None:
        self.cluster, self.name, self.namespace = cluster, name, namespace

    def helm(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        argv = [tools.tool("helm"), f"--kubeconfig={self.cluster.kubeconfig}", "--namespace", self.namespace, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
        return result

    @property
    def operator(self) -> str:
        return f"{self.name}-slm-monitoring-operator"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.operator}"

    def leftovers(self) -> list[str]:
        selector = f"app.kubernetes.io/instance={self.name}"
        found = self.cluster.kubectl("get", CHART_KINDS, "--all-namespaces", "-l", selector, "-o", "name").stdout
        found += self.cluster.kubectl("get", CLUSTER_KINDS, "-l", selector, "-o", "name").stdout
        return found.split()


@pytest.fixture(scope="module")
def release(cluster: ClusterBase) -> Iterator[Release]:
    """The chart installed with its defaults in a namespace enforcing the restricted Pod Security
    Standard, on a cluster serving the Prometheus Operator CRDs."""
    cluster.install_prometheus_operator_crds()
    namespace = cluster.new_namespace("slm-chart")
    installed = Release(cluster, f"chart-{uuid.uuid4().hex[:5]}", namespace)
    installed.helm("install", installed.name, str(CHART), "--wait", "--timeout", "180s")
    yield installed
    installed.helm("uninstall", installed.name, "--wait", check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def subject_access_review(cluster: ClusterBase, user: str, **attributes: str) -> bool:
    """Ask the API server's authorizer whether `user` (a ServiceAccount) may do what `attributes` say."""
    namespace = user.split(":")[2]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    answer = json.loads(cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)
    return bool(answer["status"].get("allowed"))


# --- install ----------------------------------------------------------------------------------------

def test_install_runs_the_operator_under_restricted_pod_security_with_its_monitoring(release: Release) -> None:
    cluster = release.cluster
    deployment = cluster.kubectl_json("get", "deployment", release.operator, "-n", release.namespace)
    assert deployment["status"].get("availableReplicas") == 1
    crd = cluster.kubectl_json("get", "crd", "slmdeployments.slm.dev")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    # The Prometheus Operator API is served, so `.Capabilities` let the monitors through.
    cluster.kubectl("get", "servicemonitor", release.operator, "-n", release.namespace)
    cluster.kubectl("get", "prometheusrule", release.operator, "-n", release.namespace)
    cluster.kubectl("get", "configmap", f"{release.name}-slm-monitoring-fleet-dashboard", "-n", release.namespace)


def test_helm_test_passes(release: Release) -> None:
    """`helm test`: the hook Jobs are admitted under the restricted Pod Security Standard, their RBAC
    binds, they complete and are deleted afterwards. (KWOK completes Job pods without running them, so
    here this does not prove /healthz answers; on kind it does.)"""
    release.helm("test", release.name, "--timeout", "120s")
    assert not release.cluster.kubectl(
        "get", "jobs", "-n", release.namespace, "-l", "app.kubernetes.io/component=test", "-o", "name"
    ).stdout.strip()


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_ci_variant_passes_a_server_side_dry_run(release: Release, values: Path) -> None:
    """The API server (schemas, CRDs, admission) accepts every object of every ci/ variant. Namespaces
    the variants name are pointed at the release's own, which exists."""
    rendered = render(values=[values], release=f"dry-{values.name.split('-')[0]}", namespace=release.namespace,
                      set_values=[f"operator.watchNamespaces={{{release.namespace}}}"]
                      if "namespaced" in values.name else [f"dashboards.namespace={release.namespace}"])
    result = release.cluster.kubectl("apply", "--dry-run=server", "-n", release.namespace, "-f", "-",
                                     input=rendered, check=False)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


def test_the_documented_crd_upgrade_command_works(release: Release) -> None:
    """README: Helm never upgrades CRDs; `helm show crds … | kubectl apply --server-side` does."""
    crds = release.helm("show", "crds", str(CHART)).stdout
    assert "slmdeployments.slm.dev" in crds
    result = release.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crds)
    assert "slmdeployments.slm.dev serverside-applied" in result.stdout


def test_dcgm_exporter_runs_on_every_gpu_node_and_only_there(cluster: ClusterBase) -> None:
    """The DaemonSet lands on the (fake) GPU nodes, not on CPU nodes. It needs a namespace that admits
    privileged pods (root, hostPath), so not a restricted one."""
    cluster.install_prometheus_operator_crds()
    namespace = cluster.new_namespace("slm-gpu", restricted=False)
    gpu = Release(cluster, f"gpu-{uuid.uuid4().hex[:5]}", namespace)
    try:
        # The GPU nodes are KWOK's; where they are tainted as fake (kind), the exporter is let onto them.
        tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, FAKE_NODE_TOLERATION]
        gpu.helm("install", gpu.name, str(CHART), "--wait", "--timeout", "180s",
                 "--set", "dcgmExporter.enabled=true", "--set", "tests.enabled=false",
                 "--set-json", f"dcgmExporter.tolerations={json.dumps(tolerations)}")
        name = f"{gpu.name}-slm-monitoring-dcgm-exporter"
        gpu_nodes = {n["metadata"]["name"] for n in cluster.kubectl_json(
            "get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]}
        assert gpu_nodes, "the cluster has no GPU nodes to place the exporter on"

        def on_every_gpu_node() -> bool:
            pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l",
                                        "app.kubernetes.io/component=dcgm-exporter")["items"]
            return {p["spec"].get("nodeName") for p in pods} == gpu_nodes

        wait_for("an exporter pod on each GPU node", on_every_gpu_node, timeout=60)
        daemonset = cluster.kubectl_json("get", "daemonset", name, "-n", namespace)
        assert daemonset["status"]["desiredNumberScheduled"] == len(gpu_nodes)
        cluster.kubectl("get", "servicemonitor", name, "-n", namespace)
    finally:
        gpu.helm("uninstall", gpu.name, "--wait", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --- what the ServiceAccount may do ----------------------------------------------------------------

ALLOWED = [
    {"verb": "watch", "group": "slm.dev", "resource": "slmdeployments"},
    {"verb": "patch", "group": "slm.dev", "resource": "slmdeployments", "namespace": "team-x"},
    {"verb": "patch", "group": "slm.dev", "resource": "slmdeployments", "subresource": "status", "namespace": "a"},
    {"verb": "create", "group": "apps", "resource": "deployments", "namespace": "team-x"},
    {"verb": "patch", "group": "", "resource": "services", "namespace": "team-x"},
    {"verb": "delete", "group": "", "resource": "configmaps", "namespace": "team-x"},
    {"verb": "create", "group": "policy", "resource": "poddisruptionbudgets", "namespace": "team-x"},
    {"verb": "delete", "group": "networking.k8s.io", "resource": "networkpolicies", "namespace": "team-x"},
    {"verb": "create", "group": "monitoring.coreos.com", "resource": "prometheusrules", "namespace": "team-x"},
    {"verb": "delete", "group": "monitoring.coreos.com", "resource": "alertmanagerconfigs", "namespace": "a"},
    {"verb": "list", "group": "monitoring.coreos.com", "resource": "prometheuses"},
    {"verb": "create", "group": "", "resource": "events", "namespace": "team-x"},
    {"verb": "get", "group": "", "resource": "secrets", "namespace": "team-x", "name": "slack"},
    {"verb": "list", "group": "", "resource": "nodes"},
    {"verb": "watch", "group": "apiextensions.k8s.io", "resource": "customresourcedefinitions"},
]

DENIED = [
    # Secrets: never enumerated, never written.
    {"verb": "list", "group": "", "resource": "secrets"},
    {"verb": "list", "group": "", "resource": "secrets", "namespace": "team-x"},
    {"verb": "watch", "group": "", "resource": "secrets"},
    {"verb": "create", "group": "", "resource": "secrets", "namespace": "team-x"},
    {"verb": "update", "group": "", "resource": "secrets", "namespace": "team-x", "name": "slack"},
    # Wildcards are not granted, even in part.
    {"verb": "*", "group": "apps", "resource": "deployments", "namespace": "team-x"},
    {"verb": "get", "group": "*", "resource": "*"},
    {"verb": "delete", "group": "slm.dev", "resource": "slmdeployments", "namespace": "team-x"},
    # Verbs the code never uses (tests/operator/test_rbac.py): no update anywhere, no deleting what the
    # garbage collector deletes, no pods, no finalizers, no patching Events.
    {"verb": "update", "group": "slm.dev", "resource": "slmdeployments", "subresource": "finalizers",
     "namespace": "a"},
    {"verb": "update", "group": "monitoring.coreos.com", "resource": "alertmanagerconfigs", "namespace": "a"},
    {"verb": "delete", "group": "", "resource": "services", "namespace": "team-x"},
    {"verb": "delete", "group": "apps", "resource": "deployments", "namespace": "team-x"},
    {"verb": "watch", "group": "", "resource": "pods"},
    {"verb": "patch", "group": "", "resource": "events", "namespace": "team-x"},
    # Other kinds, and escalation paths.
    {"verb": "create", "group": "", "resource": "pods", "namespace": "team-x"},
    {"verb": "delete", "group": "", "resource": "pods", "namespace": "team-x"},
    {"verb": "create", "group": "", "resource": "pods", "subresource": "exec", "namespace": "team-x"},
    {"verb": "create", "group": "apps", "resource": "daemonsets", "namespace": "team-x"},
    {"verb": "create", "group": "batch", "resource": "jobs", "namespace": "team-x"},
    {"verb": "update", "group": "", "resource": "nodes"},
    {"verb": "delete", "group": "", "resource": "namespaces"},
    {"verb": "list", "group": "", "resource": "namespaces"},
    {"verb": "create", "group": "apiextensions.k8s.io", "resource": "customresourcedefinitions"},
    {"verb": "create", "group": "rbac.authorization.k8s.io", "resource": "clusterrolebindings"},
    {"verb": "escalate", "group": "rbac.authorization.k8s.io", "resource": "clusterroles"},
    {"verb": "impersonate", "group": "", "resource": "serviceaccounts"},
    {"verb": "create", "group": "", "resource": "serviceaccounts", "subresource": "token", "namespace": "a"},
    {"verb": "create", "group": "monitoring.coreos.com", "resource": "prometheuses", "namespace": "team-x"},
]


def _describe(attributes: dict[str, str]) -> str:
    return "-".join(v or "core" for v in attributes.values())


@pytest.mark.parametrize("attributes", ALLOWED, ids=_describe)
def test_operator_service_account_may(release: Release, attributes: dict[str, str]) -> None:
    assert subject_access_review(release.cluster, release.user, **attributes)


@pytest.mark.parametrize("attributes", DENIED, ids=_describe)
def test_operator_service_account_may_not(release: Release, attributes: dict[str, str]) -> None:
    assert not subject_access_review(release.cluster, release.user, **attributes)


def test_subject_access_reviews_distinguish_identities(release: Release) -> None:
    """The reviews above can fail: another ServiceAccount of the same namespace gets none of it."""
    stranger = f"system:serviceaccount:{release.namespace}:default"
    assert not subject_access_review(release.cluster, stranger, verb="watch", group="slm.dev",
                                     resource="slmdeployments")


# --- the operator under the chart's identity ----------------------------------------------------------

@contextlib.contextmanager
def running_operator(release: Release, workdir: Path, *scope: str) -> Iterator[dict[str, Any]]:
    """`slm-operator <scope>` as a process, authenticated only by a token of the chart's ServiceAccount
    (it cannot run in a pod here: KWOK fakes pods)."""
    kubeconfig = release.cluster.kubeconfig_for_service_account(release.namespace, release.operator)
    log = workdir / "operator.log"
    health, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "SLM_OPERATOR_BIND_HOST": "127.0.0.1",
        "SLM_OPERATOR_RESYNC_SECONDS": "5",
        # Node capacity and Prometheus selectors are cached this long; short, so the test is quick.
        "SLM_OPERATOR_DISCOVERY_TTL_SECONDS": "1",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "slm_operator.cli", *scope, f"--health-port={health}", f"--metrics-port={metrics}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
    try:
        wait_for("the operator's /healthz", lambda: _http_ok(f"http://127.0.0.1:{health}/healthz"), timeout=60)
        yield {"process": process, "log": log, "metrics": metrics}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def operator_process(release: Release, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with running_operator(release, tmp_path, "--all-namespaces") as operator:
        yield operator


def assert_never_forbidden(operator: dict[str, Any]) -> None:
    assert operator["process"].poll() is None, operator["log"].read_text()[-3000:]
    log = operator["log"].read_text()
    forbidden = [line for line in log.splitlines() if "forbidden" in line.lower() or " 403" in line]
    assert not forbidden, "\n".join(forbidden[:20])


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def fake_node_example(file: str) -> dict[str, Any]:
    """An example SLMDeployment whose pods run on the fake nodes only (tainted on kind, whose own node must
    get no test pod)."""
    obj = yaml.safe_load((REPO_ROOT / "examples" / file).read_text())
    spec = obj["spec"]
    spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **FAKE_NODE_SELECTOR}
    spec["tolerations"] = [*spec.get("tolerations", []), FAKE_NODE_TOLERATION]
    return dict(obj)


def _conditions(cluster: ClusterBase, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    status = cluster.kubectl_json("get", "slmdeployment", name, "-n", namespace).get("status") or {}
    return {c["type"]: c for c in status.get("conditions", [])}


def _has_condition(cluster: ClusterBase, namespace: str, name: str, **wanted: str) -> bool:
    return any(all(c.get(k) == v for k, v in wanted.items()) for c in _conditions(cluster, namespace, name).values())


def test_operator_with_the_chart_rbac_reconciles_the_examples(
    release: Release, operator_process: dict[str, Any],
) -> None:
    """The proof that the RBAC is sufficient: the operator, holding only the chart's permissions, does
    everything the examples need, and every check that needs a permission it tolerates losing (nodes,
    Secrets, Prometheus resources: a 403 there skips the check silently) demonstrably ran:
    - examples/tiny-cpu.yaml gets its children, with the labels a Prometheus resource selects;
    - examples/with-notifications.yaml asking for 64 GPUs is reported InsufficientGPU (nodes read),
      its missing Secrets as SecretNotFound (Secrets read by name), and once they exist its
      AlertmanagerConfig is created and MonitoringReady turns True;
    and the API server never answered Forbidden."""
    cluster = release.cluster
    namespace = cluster.new_namespace("slm-app")
    prometheus = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
        "metadata": {"name": "kps", "namespace": namespace},
        "spec": {"serviceMonitorSelector": {"matchLabels": {"release": "kps-e2e"}},
                 "ruleSelector": {"matchLabels": {"release": "kps-e2e"}}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(prometheus))
    try:
        tiny = fake_node_example("tiny-cpu.yaml")
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(tiny))
        name = tiny["metadata"]["name"]

        def children_exist() -> bool:
            got = cluster.kubectl_json("get", "deployment,service,servicemonitor,prometheusrule", "-n", namespace,
                                       "-l", f"app.kubernetes.io/instance={name}")["items"]
            selected = {i["kind"] for i in got if i["metadata"]["labels"].get("release") == "kps-e2e"}
            return {i["kind"] for i in got} == {"Deployment", "Service", "ServiceMonitor", "PrometheusRule"} and (
                selected == {"ServiceMonitor", "PrometheusRule"})

        wait_for("tiny-cpu's children, monitors labelled for the Prometheus", children_exist, timeout=90)
        wait_for("tiny-cpu MonitoringReady=True",
                 lambda: _has_condition(cluster, namespace, name, type="MonitoringReady", status="True"), timeout=60)

        notified = fake_node_example("with-notifications.yaml")
        notified["spec"]["resources"]["gpus"] = 16  # more than any (fake) node has
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(notified))
        other = notified["metadata"]["name"]
        wait_for("InsufficientGPU", lambda: _has_condition(cluster, namespace, other, reason="InsufficientGPU"),
                 timeout=60)
        wait_for("SecretNotFound", lambda: _has_condition(cluster, namespace, other, type="MonitoringReady",
                                                          status="False", reason="SecretNotFound"), timeout=60)
        for secret, key in (("slack", "url"), ("smtp", "password"), ("hook", "url")):
            cluster.kubectl("create", "secret", "generic", secret, "-n", namespace, f"--from-literal={key}=x")
        wait_for("MonitoringReady=True once the Secrets exist",
                 lambda: _has_condition(cluster, namespace, other, type="MonitoringReady", status="True"),
                 timeout=60)
        cluster.kubectl("get", "alertmanagerconfig", "-n", namespace, "-l", f"app.kubernetes.io/instance={other}")
        assert cluster.kubectl_json("get", "alertmanagerconfigs", "-n", namespace)["items"]

        assert_never_forbidden(operator_process)

        for example in (name, other):
            cluster.kubectl("delete", "slmdeployment", example, "-n", namespace, "--wait=true", "--timeout=60s")
    finally:
        cluster.kubectl("delete", "prometheus", "kps", "-n", namespace, "--ignore-not-found")
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --- upgrade and uninstall --------------------------------------------------------------------------

def test_upgrade_to_namespaced_mode_runs_the_operator_on_roles_only_and_back(
    release: Release, tmp_path: Path,
) -> None:
    """After `helm upgrade` to namespaced mode the operator's permissions on namespaced objects come
    from a Role in the watched namespace only, and the operator, run with `--namespace`, still
    reconciles there; upgrading back restores the cluster-wide mode and removes the Role."""
    cluster = release.cluster
    watched = cluster.new_namespace("slm-watched")
    release.helm("upgrade", release.name, str(CHART), "--wait", "--timeout", "180s",
                 "--set", f"operator.watchNamespaces={{{watched}}}", "--set", "operator.logFormat=plain")
    deployment = cluster.kubectl_json("get", "deployment", release.operator, "-n", release.namespace)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["slm-operator", f"--namespace={watched}"]
    assert {"name": "SLM_OPERATOR_LOG_FORMAT", "value": "plain"} in container["env"]
    assert subject_access_review(cluster, release.user, verb="create", group="apps", resource="deployments",
                                 namespace=watched)
    assert not subject_access_review(cluster, release.user, verb="create", group="apps", resource="deployments",
                                     namespace="elsewhere")
    assert not subject_access_review(cluster, release.user, verb="watch", group="slm.dev", resource="slmdeployments")

    tiny = fake_node_example("tiny-cpu.yaml")
    with running_operator(release, tmp_path, f"--namespace={watched}") as operator:
        cluster.kubectl("apply", "-n", watched, "-f", "-", input=json.dumps(tiny))
        name = tiny["metadata"]["name"]
        wait_for("MonitoringReady=True in the watched namespace",
                 lambda: _has_condition(cluster, watched, name, type="MonitoringReady", status="True"), timeout=90)
        cluster.kubectl("get", "deployment,service,servicemonitor,prometheusrule", name, "-n", watched)
        assert_never_forbidden(operator)
        cluster.kubectl("delete", "slmdeployment", name, "-n", watched, "--wait=true", "--timeout=60s")

    release.helm("upgrade", release.name, str(CHART), "--wait", "--timeout", "180s", "--reset-values")
    assert not cluster.kubectl("get", "roles", "-n", watched, "-o", "name").stdout.strip()
    assert subject_access_review(cluster, release.user, verb="create", group="apps", resource="deployments",
                                 namespace="elsewhere")
    cluster.kubectl("delete", "namespace", watched, "--wait=false", check=False)


def test_without_secret_reference_checks_the_operator_still_routes_notifications(
    release: Release, tmp_path: Path,
) -> None:
    """rbac.secretReferenceChecks=false takes `get secrets` away; the referenced Secrets are then not
    verified, but the AlertmanagerConfig is still written and the operator never loops on Forbidden."""
    cluster = release.cluster
    release.helm("upgrade", release.name, str(CHART), "--wait", "--timeout", "180s",
                 "--set", "rbac.secretReferenceChecks=false")
    assert not subject_access_review(cluster, release.user, verb="get", group="", resource="secrets",
                                     namespace="team-x", name="slack")
    namespace = cluster.new_namespace("slm-nosecrets")
    try:
        notified = fake_node_example("with-notifications.yaml")
        with running_operator(release, tmp_path, "--all-namespaces") as operator:
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(notified))
            name = notified["metadata"]["name"]

            def written() -> bool:
                return bool(cluster.kubectl_json("get", "alertmanagerconfigs", "-n", namespace)["items"])

            def forbidden() -> bool:
                return "forbidden" in operator["log"].read_text().lower()

            # Ends early on the first Forbidden, so the failing case costs seconds, not the whole deadline.
            wait_for("the AlertmanagerConfig, or a Forbidden answer", lambda: written() or forbidden(), timeout=30)
            assert_never_forbidden(operator)
            assert written()
            cluster.kubectl("delete", "slmdeployment", name, "-n", namespace, "--wait=true", "--timeout=60s")
    finally:
        release.helm("upgrade", release.name, str(CHART), "--wait", "--timeout", "180s", "--reset-values")
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_uninstall_leaves_nothing_behind_but_the_crd(release: Release) -> None:
    assert release.leftovers(), "the check below must be able to see the release's objects"
    release.helm("uninstall", release.name, "--wait", "--timeout", "120s")

    wait_for("every object of the release to be gone", lambda: not release.leftovers(), timeout=60)
    # Helm never deletes CRDs (documented in the chart README).
    release.cluster.kubectl("get", "crd", "slmdeployments.slm.dev")
    assert not subject_access_review(release.cluster, release.user, verb="watch", group="slm.dev",
                                     resource="slmdeployments")
