"""A plain alertmanager.yml from AlertmanagerConfig specs, the way the Prometheus Operator builds it.

Only for running a real Alertmanager outside Kubernetes (tests, the demo): the operator in a cluster
writes the AlertmanagerConfig object and the Prometheus Operator does this conversion itself. Mirrors
prometheus-operator v0.85 `pkg/alertmanager/amcfg.go` for the fields this project renders:
receiver names become `<namespace>/<config name>/<receiver>`, the config's route becomes a child of
the top route with `namespace="<namespace>"` prepended to its matchers and `continue: true`, inhibit
rules get the same namespace matcher on source and target, camelCase keys become snake_case, and
SecretKeySelectors are replaced by the secret's value (from `secrets`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

NULL_RECEIVER = "null"
Secrets = Mapping[str, Mapping[str, str]]  # {secret name: {key: value}}

_SECRET_FIELDS = {"apiURL": "api_url", "authPassword": "auth_password", "authSecret": "auth_secret",
                  "urlSecret": "url"}  # fmt: skip
_RENAMES = {"sendResolved": "send_resolved", "requireTLS": "require_tls", "authUsername": "auth_username",
            "authIdentity": "auth_identity", "maxAlerts": "max_alerts"}  # fmt: skip


class MissingSecret(KeyError):
    """A SecretKeySelector names a secret or key that was not given."""


def _snake(name: str) -> str:
    return _RENAMES.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _matcher_text(matcher: Mapping[str, Any]) -> str:
    value = str(matcher.get("value", "")).replace("\\", "\\\\").replace('"', '\\"')
    return f'{matcher["name"]}{matcher.get("matchType", "=")}"{value}"'


def _resolve(selector: Mapping[str, str], secrets: Secrets) -> str:
    try:
        return secrets[selector["name"]][selector["key"]]
    except KeyError as missing:
        raise MissingSecret(f"secret {selector['name']!r} key {selector['key']!r} not given") from missing


def _convert_config(config: Mapping[str, Any], secrets: Secrets) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in config.items():
        if key in _SECRET_FIELDS:
            result[_SECRET_FIELDS[key]] = _resolve(value, secrets)
        elif key == "headers":
            result["headers"] = {item["key"]: item["value"] for item in value}
        else:
            result[_snake(key)] = value
    return result


def _receiver_name(namespace: str, config_name: str, receiver: str) -> str:
    return f"{namespace}/{config_name}/{receiver}"


def _convert_route(route: Mapping[str, Any], namespace: str, config_name: str, *, top: bool) -> dict[str, Any]:
    matchers = [_matcher_text(m) for m in route.get("matchers", [])]
    if top:
        matchers.insert(0, f'namespace="{namespace}"')
    result: dict[str, Any] = {"receiver": _receiver_name(namespace, config_name, route["receiver"])}
    if route.get("groupBy"):
        result["group_by"] = list(route["groupBy"])
    for key in ("groupWait", "groupInterval", "repeatInterval"):
        if route.get(key):
            result[_snake(key)] = route[key]
    if matchers:
        result["matchers"] = matchers
    result["continue"] = True if top else bool(route.get("continue", False))
    if route.get("routes"):
        result["routes"] = [_convert_route(child, namespace, config_name, top=False) for child in route["routes"]]
    return result


def alertmanager_config(
    configs: list[tuple[str, str, Mapping[str, Any]]],
    *,
    secrets: Mapping[str, Secrets] | None = None,
    global_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """alertmanager.yml (as a dict) from [(namespace, AlertmanagerConfig name, spec)].

    `secrets` maps namespace -> {secret name: {key: value}}.
    """
    secrets = secrets or {}
    receivers: list[dict[str, Any]] = [{"name": NULL_RECEIVER}]
    routes: list[dict[str, Any]] = []
    inhibit_rules: list[dict[str, Any]] = []
    for namespace, config_name, spec in configs:
        namespace_secrets = secrets.get(namespace, {})
        for receiver in spec.get("receivers", []):
            converted: dict[str, Any] = {"name": _receiver_name(namespace, config_name, receiver["name"])}
            for key, items in receiver.items():
                if key == "name":
                    continue
                converted[_snake(key)] = [_convert_config(item, namespace_secrets) for item in items]
            receivers.append(converted)
        routes.append(_convert_route(spec["route"], namespace, config_name, top=True))
        for rule in spec.get("inhibitRules", []):
            namespace_matcher = f'namespace="{namespace}"'
            inhibit_rules.append(
                {
                    "source_matchers": [namespace_matcher, *(_matcher_text(m) for m in rule.get("sourceMatch", []))],
                    "target_matchers": [namespace_matcher, *(_matcher_text(m) for m in rule.get("targetMatch", []))],
                    "equal": list(rule.get("equal", [])),
                }
            )
    document: dict[str, Any] = {
        "route": {"receiver": NULL_RECEIVER, "group_by": ["namespace"], "routes": routes},
        "receivers": receivers,
        "inhibit_rules": inhibit_rules,
    }
    if global_config:
        document["global"] = dict(global_config)
    return document


def alertmanager_yaml(
    configs: list[tuple[str, str, Mapping[str, Any]]],
    *,
    secrets: Mapping[str, Secrets] | None = None,
    global_config: Mapping[str, Any] | None = None,
) -> str:
    header = "# Generated by slm_devtools.alertmanager_yaml from AlertmanagerConfig specs.\n"
    return header + yaml.safe_dump(
        alertmanager_config(configs, secrets=secrets, global_config=global_config), sort_keys=False
    )
