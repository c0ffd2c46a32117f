"""The apply decision: a no-op resync must write nothing, any drift or spec change must write."""

from __future__ import annotations

import copy
from typing import Any

from slm_operator.kube import APPLIED_HASH, RESOURCES, is_subset, with_applied_hash


def test_server_added_fields_do_not_count_as_drift() -> None:
    containers = [{"name": "s", "image": "i"}]
    desired: dict[str, Any] = {"spec": {"replicas": 1, "template": {"spec": {"containers": containers}}}}
    live = copy.deepcopy(desired)
    live["spec"]["progressDeadlineSeconds"] = 600
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    live["status"] = {"readyReplicas": 1}
    assert is_subset(desired, live)


def test_quantities_and_int_or_string_compare_by_value() -> None:
    assert is_subset({"cpu": "1000m", "memory": "1Gi"}, {"cpu": "1", "memory": "1073741824"})
    assert is_subset({"port": 8000}, {"port": "8000"})
    assert not is_subset({"cpu": "2"}, {"cpu": "1"})
    assert not is_subset({"flag": True}, {"flag": "true"})


def test_empty_maps_and_lists_the_server_omits_are_equal() -> None:
    assert is_subset({"nodeSelector": {}, "tolerations": [], "spec": {"a": 1}}, {"spec": {"a": 1}})


def test_hand_edits_are_drift() -> None:
    desired: dict[str, Any] = {"spec": {"groups": [{"name": "g", "rules": [{"expr": "x > 0.05"}]}]}}
    edited = copy.deepcopy(desired)
    edited["spec"]["groups"][0]["rules"][0]["expr"] = "x > 0.5"
    assert not is_subset(desired, edited)
    shorter: dict[str, Any] = {"spec": {"groups": []}}
    assert not is_subset(desired, shorter)
    assert not is_subset(desired, {})


def test_a_removed_field_changes_the_applied_hash() -> None:
    """Subset alone cannot notice a field the operator stopped setting; the hash annotation does."""
    before: dict[str, Any] = {"metadata": {"name": "a"}, "spec": {"nodeSelector": {"gpu": "h100"}, "replicas": 1}}
    after = {"metadata": {"name": "a"}, "spec": {"replicas": 1}}
    live = with_applied_hash(before)
    assert is_subset(after, live)  # the subset test alone would skip the apply
    assert not is_subset(with_applied_hash(after), live)
    assert with_applied_hash(before)["metadata"]["annotations"][APPLIED_HASH] == live["metadata"]["annotations"][
        APPLIED_HASH]
    assert "annotations" not in before["metadata"]  # the input is not mutated


def test_resource_paths() -> None:
    assert RESOURCES["Deployment"].path("ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert RESOURCES["Service"].path("ns") == "/api/v1/namespaces/ns/services"
    assert RESOURCES["Node"].path("ignored") == "/api/v1/nodes"
    status_path = "/apis/slm.dev/v1alpha1/namespaces/ns/slmdeployments/x/status"
    assert RESOURCES["SLMDeployment"].path("ns", "x", "status") == status_path


def test_items_another_manager_adds_to_a_merged_list_are_not_drift() -> None:
    """Issue 23.1: Service ports, env, volumes… are merged item by item under server-side apply: an item
    someone else added stays after our apply, so counting it as drift would rewrite the object forever."""
    desired: dict[str, Any] = {"spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]}}
    live = {"spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "http"},
                               {"name": "debug", "port": 9000, "protocol": "TCP"}]}}
    assert is_subset(desired, live)
    live["spec"]["ports"][0]["port"] = 8001  # our item changed: drift
    assert not is_subset(desired, live)
    env = {"spec": {"template": {"spec": {"containers": [{"name": "server", "env": [{"name": "A", "value": "1"}]}]}}}}
    injected = copy.deepcopy(env)
    injected["spec"]["template"]["spec"]["containers"][0]["env"].insert(0, {"name": "PROXY", "value": "x"})
    injected["spec"]["template"]["spec"]["containers"].append({"name": "istio-proxy"})
    assert is_subset(env, injected)
    owners = {"metadata": {"ownerReferences": [{"uid": "ours"}]}}
    assert is_subset(owners, {"metadata": {"ownerReferences": [{"uid": "theirs"}, {"uid": "ours"}]}})


def test_atomic_lists_still_compare_whole() -> None:
    """Lists an apply replaces whole (tolerations, rule groups, NetworkPolicy peers) must equal ours."""
    desired: dict[str, Any] = {"spec": {"template": {"spec": {"tolerations": [{"key": "a"}]}}}}
    assert not is_subset(desired, {"spec": {"template": {"spec": {"tolerations": [{"key": "a"}, {"key": "b"}]}}}})
