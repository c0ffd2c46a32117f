"""The Prometheus Operator in the loop: what it generates is what runs, and an object that does not get
through fails with a message naming it and saying why.

Against the session's cluster and `prometheus_stack` (the real Prometheus Operator with kube-prometheus-
stack's Prometheus and Alertmanager). The broken objects here are written by hand on purpose: they are
the mistakes (a port name, a label, a rule, a Secret) the operator could make, and the point is that
such a mistake shows up as a failure that says which object and what is wrong.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from slm_devtools.cluster import ClusterBase
from slm_devtools.promstack import NotConsumed, PrometheusStack
from slm_devtools.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane]

RELEASE = {"release": "kube-prometheus-stack"}
RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def apply(cluster: ClusterBase, namespace: str, *objects: dict[str, Any]) -> None:
    for obj in objects:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def web_workload(name: str) -> list[dict[str, Any]]:
    """A Deployment (KWOK runs its pod) and its Service, whose port is named `http`."""
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": {"app": name}},
                               "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1",
                                                        "securityContext": RESTRICTED,
                                                        "ports": [{"name": "http", "containerPort": 8000}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}},
         "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}},
    ]


def service_monitor(name: str, *, port: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": name, "labels": labels},
            "spec": {"selector": {"matchLabels": {"app": name}}, "endpoints": [{"port": port, "interval": "1s"}]}}


def test_a_wrong_port_name_in_a_service_monitor_fails_naming_the_object_and_the_port(
        cluster: ClusterBase, prometheus_stack: PrometheusStack, namespace: str) -> None:
    apply(cluster, namespace, *web_workload("web"), service_monitor("web", port="metrics", labels=RELEASE))

    with pytest.raises(NotConsumed) as failure:
        prometheus_stack.wait_target_up(namespace, "web", timeout=15)

    message = str(failure.value)
    assert message.startswith(f"ServiceMonitor {namespace}/web: no target up in Prometheus "
                              "monitoring/kube-prometheus-stack-prometheus within 15s")
    assert f"endpoints[0].port 'metrics' is not a port name of Service {namespace}/web (its ports: ['http'])" in message


def test_a_service_monitor_prometheus_does_not_select_fails_naming_the_selector(
        cluster: ClusterBase, prometheus_stack: PrometheusStack, namespace: str) -> None:
    apply(cluster, namespace, *web_workload("api"), service_monitor("api", port="http", labels={"release": "other"}))

    with pytest.raises(NotConsumed) as failure:
        prometheus_stack.wait_target_up(namespace, "api", timeout=15)

    assert (f"ServiceMonitor {namespace}/api: no target up" in str(failure.value)
            and 'Prometheus monitoring/kube-prometheus-stack-prometheus does not select it: its serviceMonitorSelector '
                '{"matchLabels": {"release": "kube-prometheus-stack"}} does not match the ServiceMonitor\'s labels '
                '{"release": "other"}' in str(failure.value))


def test_a_rule_the_prometheus_operator_rejects_fails_with_its_reason(
        cluster: ClusterBase, prometheus_stack: PrometheusStack, namespace: str) -> None:
    """The CRD takes any string as `expr`; the Prometheus Operator parses it and leaves the rule out."""
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "broken", "labels": RELEASE},
            "spec": {"groups": [{"name": "broken.rules", "rules": [
                {"alert": "Broken", "expr": "rate(api_requests_total[5m] > 1", "for": "1m"}]}]}}
    apply(cluster, namespace, rule)

    with pytest.raises(NotConsumed) as failure:
        prometheus_stack.wait_rules_loaded(namespace, "broken", timeout=20)

    message = str(failure.value)
    assert message.startswith(f"PrometheusRule {namespace}/broken: not loaded by Prometheus "
                              "monitoring/kube-prometheus-stack-prometheus")
    assert ("rejected by the Prometheus Operator: PrometheusRule broken was rejected due to invalid configuration: "
            "invalid rule") in message  # its Event
    assert ('the Prometheus Operator\'s log: 5:11: group "broken.rules", rule 1, "Broken": could not parse '
            "expression: 1:32: parse error: unclosed left parenthesis") in message


def test_an_alertmanager_config_whose_secret_is_missing_fails_naming_it(
        cluster: ClusterBase, prometheus_stack: PrometheusStack, namespace: str) -> None:
    config = {"apiVersion": "monitoring.coreos.com/v1alpha1", "kind": "AlertmanagerConfig",
              "metadata": {"name": "paging"},
              "spec": {"route": {"receiver": "hook"},
                       "receivers": [{"name": "hook", "webhookConfigs": [{"urlSecret": {"name": "absent",
                                                                                         "key": "url"}}]}]}}
    apply(cluster, namespace, config)

    with pytest.raises(NotConsumed) as failure:
        prometheus_stack.wait_alertmanager_config(namespace, "paging", timeout=20)

    message = str(failure.value)
    assert message.startswith(f"AlertmanagerConfig {namespace}/paging: not in Alertmanager "
                              "monitoring/kube-prometheus-stack-alertmanager's configuration")
    assert "rejected by the Prometheus Operator" in message and '"absent"' in message


def test_prometheus_runs_the_generated_configuration_with_only_the_documented_adaptation(
        prometheus_stack: PrometheusStack, tmp_path) -> None:
    """The running configuration is the generated one but for the three documented changes (API access,
    paths, pod network), and promtool accepts it."""
    generated = prometheus_stack.generated_prometheus_config()
    pod = prometheus_stack.prometheus_pod
    assert pod is not None
    running = yaml.safe_load((pod.volume_dir("config-out") / "prometheus.env.yaml").read_text())

    assert running["global"]["external_labels"] == {
        "prometheus": "monitoring/kube-prometheus-stack-prometheus",
        "prometheus_replica": "prometheus-kube-prometheus-stack-prometheus-0"}  # the reloader's envsubst
    assert generated["rule_files"] == [
        "/etc/prometheus/rules/prometheus-kube-prometheus-stack-prometheus-rulefiles-0/*.yaml"]
    assert running["rule_files"] == [
        f"{pod.volume_dir('prometheus-kube-prometheus-stack-prometheus-rulefiles-0')}/*.yaml"]
    (manager,) = running["alerting"]["alertmanagers"]
    (generated_manager,) = generated["alerting"]["alertmanagers"]
    assert manager["relabel_configs"][:-1] == generated_manager["relabel_configs"]
    assert manager["relabel_configs"][-1]["target_label"] == "__address__"
    (discovery,) = manager["kubernetes_sd_configs"]
    assert discovery == {**generated_manager["kubernetes_sd_configs"][0],
                         "kubeconfig_file": str(pod.dir / "in-cluster-kubeconfig.yaml")}

    check = subprocess.run([tool("promtool"), "check", "config", "--syntax-only",
                            str(pod.volume_dir("config-out") / "prometheus.env.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_finds_alertmanager_through_the_api_server(prometheus_stack: PrometheusStack) -> None:
    """The generated `alerting` section discovers Alertmanager from its Service's Endpoints: the pod's address."""
    pod = prometheus_stack.alertmanager_pod
    assert pod is not None
    active = prometheus_stack.prometheus.api("alertmanagers")["activeAlertmanagers"]
    assert [a["url"] for a in active] == [f"http://{pod.address}:9093/api/v2/alerts"]
