"""The local control plane is the real thing: scheduling on GPU nodes, garbage collection, Pod Security
admission, CRD validation and the pinned tool versions. If these fail, no e2e result means anything."""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest

from slm_devtools import tools
from slm_devtools.cluster import (
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATION,
    FAKE_NODES,
    ClusterBase,
    fake_node_manifest,
    wait_for,
)

pytestmark = pytest.mark.e2e


def gpu_deployment(name: str, gpus: int = 1) -> dict:
    restricted = {
        "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                # On the fake nodes only (tainted on kind, whose own node must not get test pods).
                "spec": {"nodeSelector": FAKE_NODE_SELECTOR, "tolerations": [FAKE_NODE_TOLERATION], "containers": [{
                    "name": "main", "image": "example.invalid/none:1", "securityContext": restricted,
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }]},
            },
        },
    }


def pods(cluster: ClusterBase, namespace: str, selector: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def test_gpu_pod_is_scheduled_on_a_fake_gpu_node_and_runs(cluster: ClusterBase, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("gpu-user")))

    def running() -> bool:
        items = pods(cluster, namespace, "app=gpu-user")
        return len(items) == 1 and items[0]["status"].get("phase") == "Running"

    wait_for("the GPU pod to be Running", running, timeout=60)
    pod = pods(cluster, namespace, "app=gpu-user")[0]
    node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1


def test_gpu_request_no_node_can_satisfy_stays_pending(cluster: ClusterBase, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("too-big", gpus=64)))

    def unschedulable() -> bool:
        items = pods(cluster, namespace, "app=too-big")
        conditions = items[0]["status"].get("conditions", []) if items else []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)

    wait_for("the scheduler to report the pod Unschedulable", unschedulable, timeout=60)


def test_deleting_the_owner_garbage_collects_its_pods(cluster: ClusterBase, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("collected")))
    wait_for("the pod to exist", lambda: len(pods(cluster, namespace, "app=collected")) == 1, timeout=60)

    cluster.kubectl("delete", "deployment", "collected", "-n", namespace, "--wait=false")

    wait_for("the ReplicaSet and pod to be garbage-collected", lambda: (
        not cluster.kubectl_json("get", "replicasets", "-n", namespace, "-l", "app=collected")["items"]
        and not pods(cluster, namespace, "app=collected")), timeout=90)


def test_privileged_pod_is_refused_in_a_restricted_namespace(cluster: ClusterBase, namespace: str) -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/none:1",
                                 "securityContext": {"privileged": True}}]},
    }
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)

    assert result.returncode != 0
    assert 'violates PodSecurity "restricted' in result.stderr
    assert "privileged" in result.stderr


def test_prometheus_operator_crds_install_and_validate(cluster: ClusterBase, namespace: str) -> None:
    names = cluster.install_prometheus_operator_crds()
    assert {"servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
            "alertmanagerconfigs.monitoring.coreos.com", "podmonitors.monitoring.coreos.com",
            "prometheuses.monitoring.coreos.com", "alertmanagers.monitoring.coreos.com"} <= set(names)

    bad = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "bad"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "scheme": "gopher"}]},
    }
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)

    assert result.returncode != 0
    assert "spec.endpoints[0].scheme" in result.stderr


def test_tools_report_the_pinned_versions(cluster: ClusterBase) -> None:
    pinned = tools.versions()
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert server["clientVersion"]["gitVersion"] == pinned["KUBERNETES_VERSION"]
    assert server["serverVersion"]["gitVersion"] == pinned["KUBERNETES_VERSION"]
    helm = subprocess.run([tools.tool("helm"), "version", "--template={{.Version}}"],
                          capture_output=True, text=True, check=True)
    assert helm.stdout.strip() == pinned["HELM_VERSION"]
    for binary in ("prometheus-operator", "prometheus-config-reloader"):
        version = subprocess.run([tools.tool(binary), "--version"], capture_output=True, text=True, check=True)
        assert f"{binary}, version {pinned['PROMETHEUS_OPERATOR_VERSION'].lstrip('v')} " in version.stdout


def test_a_test_user_is_subject_to_rbac(cluster: ClusterBase, namespace: str) -> None:
    kubeconfig = cluster.kubeconfig_for_user("alice")
    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()

    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "alice-view", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [cluster.rbac_subject_for_user("alice")],
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))

    wait_for("alice to be allowed to list pods", lambda: cluster.kubectl(
        "get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False).returncode == 0, timeout=30)
    may_delete = cluster.kubectl("auth", "can-i", "delete", "pods", "-n", namespace, kubeconfig=kubeconfig,
                                 check=False)
    assert may_delete.stdout.strip() == "no"


def test_pods_get_addresses_from_their_node_s_range_and_services_list_them(cluster: ClusterBase,
                                                                          namespace: str) -> None:
    """KWOK hands out pod IPs from the node's podCIDR, inside this cluster's pod network, and the
    EndpointSlice controller lists them for the Service: what Prometheus discovers targets from."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "addressed"},
               "spec": {"selector": {"app": "addressed"}, "ports": [{"name": "http", "port": 8000}]}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("addressed")))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service))

    wait_for("the pod to have an IP", lambda: bool(
        [p for p in pods(cluster, namespace, "app=addressed") if p["status"].get("podIP")]), timeout=60)
    (pod,) = pods(cluster, namespace, "app=addressed")
    ip = pod["status"]["podIP"]
    node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node["spec"]["podCIDR"])
    assert cluster.pod_network.owns(ip)
    assert cluster.pod_network.local_address(ip) == "127." + ip.split(".", 1)[1]

    def listed() -> bool:
        slices = cluster.kubectl_json("get", "endpointslices", "-n", namespace, "-l",
                                      "kubernetes.io/service-name=addressed")["items"]
        return any(ip in endpoint["addresses"] for s in slices for endpoint in s.get("endpoints") or [])

    wait_for("the EndpointSlice to list the pod", listed, timeout=60)


def test_the_api_server_refuses_loopback_addresses_in_endpoint_slices(cluster: ClusterBase, namespace: str) -> None:
    """Why pod IPs are not loopback addresses themselves (they are 10.x with a 127.x twin here): no
    Service could ever list such a pod."""
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "loopback", "labels": {"kubernetes.io/service-name": "loopback"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["127.77.0.5"]}], "ports": [{"name": "http", "port": 8000}],
    }
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(endpoint_slice), check=False)

    assert result.returncode != 0
    assert ('endpoints[0].addresses[0]: Invalid value: "127.77.0.5": may not be in the loopback range '
            "(127.0.0.0/8, ::1/128)") in result.stderr


def test_a_fake_node_tainted_as_on_kind_takes_test_pods_and_nothing_else(cluster: ClusterBase,
                                                                          namespace: str) -> None:
    """On kind the fake nodes are tainted (ExistingCluster.attach): a pod without the tests' toleration
    never lands on one, and the tests' pods (gpu_deployment, the e2e SLMDeployments) still do."""
    node = "tainted-gpu-node"
    manifest = fake_node_manifest(node, gpus=2, product="NVIDIA-L4", tainted=True,
                                  pod_cidr=cluster.pod_network.node_cidr(len(FAKE_NODES)))
    assert manifest["spec"]["taints"] == [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    try:
        cluster.wait_nodes_ready([node])
        pinned = {"kubernetes.io/hostname": node}
        untolerated = gpu_deployment("untolerated")
        untolerated["spec"]["template"]["spec"]["nodeSelector"] = pinned
        del untolerated["spec"]["template"]["spec"]["tolerations"]
        tolerated = gpu_deployment("tolerated")
        tolerated["spec"]["template"]["spec"]["nodeSelector"] = {**FAKE_NODE_SELECTOR, **pinned}
        for deployment in (untolerated, tolerated):
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))

        def placed() -> bool:
            running = pods(cluster, namespace, "app=tolerated")
            refused = pods(cluster, namespace, "app=untolerated")
            return (len(running) == 1 and running[0]["status"].get("phase") == "Running" and len(refused) == 1
                    and any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                            for c in refused[0]["status"].get("conditions", [])))

        wait_for("the tolerating pod Running there and the other one Unschedulable", placed, timeout=60)
        (refused,) = pods(cluster, namespace, "app=untolerated")
        message = next(c["message"] for c in refused["status"]["conditions"] if c["type"] == "PodScheduled")
        assert "1 node(s) had untolerated taint(s)" in message, message
    finally:
        cluster.kubectl("delete", "deployment", "untolerated", "tolerated", "-n", namespace, "--wait=true",
                        check=False)
        cluster.kubectl("delete", "node", node, "--ignore-not-found")
