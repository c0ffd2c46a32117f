"""kube-prometheus-stack selects monitors by its release label: the operator must find that label."""

from __future__ import annotations

from slm_operator.selection import labels_for, resolve, selector_matches

KPS = {"matchLabels": {"release": "kps"}}


def test_nil_selects_nothing_and_empty_selects_everything() -> None:
    assert not selector_matches(None, {"release": "kps"})
    assert selector_matches({}, {})


def test_match_expressions() -> None:
    sel = {"matchExpressions": [{"key": "team", "operator": "In", "values": ["ml", "sre"]},
                                {"key": "tier", "operator": "DoesNotExist"}]}
    assert selector_matches(sel, {"team": "sre"})
    assert not selector_matches(sel, {"team": "sre", "tier": "x"})
    assert labels_for(sel) == {"team": "ml"}
    assert labels_for({"matchExpressions": [{"key": "x", "operator": "Exists"}]}) is None


def test_empty_spec_labels_take_the_release_label_of_the_prometheus() -> None:
    assert resolve({}, [KPS], ["monitoring/kps"], "serviceMonitorSelector") == ({"release": "kps"}, None)
    assert resolve({}, [None, KPS], ["a/nil", "b/kps"], "ruleSelector") == ({"release": "kps"}, None)


def test_spec_labels_no_prometheus_selects_are_reported() -> None:
    labels, problem = resolve({"team": "ml"}, [KPS], ["monitoring/kps"], "serviceMonitorSelector")
    assert labels == {"team": "ml"}
    assert problem is not None and "monitoring/kps" in problem and "team" in problem


def test_without_prometheus_resources_nothing_is_checked() -> None:
    assert resolve({"a": "b"}, [], [], "ruleSelector") == ({"a": "b"}, None)
    assert resolve({}, [], [], "ruleSelector") == ({}, None)
