"""AlertmanagerConfig content from `spec.monitoring.notifications` (owned by the monitoring work).

One AlertmanagerConfig per SLMDeployment. The route matches this deployment's alerts only
(namespace=<namespace>, job=<name>, alertname=~"SLM.+"), groups them per deployment and alert, and fans
out by severity to the receivers the resource asks for. The namespace matcher is ours, not left to the
Prometheus Operator: under its `alertmanagerConfigMatcherStrategy: None` (or in the Alertmanager's own
namespace under `OnNamespaceExceptForAlertmanagerNamespace`) it adds none, and a tenant's receivers
would then get every namespace's alerts of a deployment with the same name. Secrets are
referenced by SecretKeySelector and resolved by the Prometheus Operator; nothing secret is copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GROUP_BY = ["namespace", "job", "alertname"]
# Alertmanager's own defaults, written out so the rendered object says what it does.
GROUP_WAIT = "30s"
GROUP_INTERVAL = "5m"
REPEAT_INTERVAL = "4h"
# Receives what no child route takes (e.g. `info` alerts when no receiver asks for them).
UNROUTED_RECEIVER = "unrouted"

SLACK_TITLE = (
    '[{{ .Status | toUpper }}{{ if eq .Status "firing" }}:{{ .Alerts.Firing | len }}{{ end }}] '
    "{{ .CommonLabels.alertname }} {{ .CommonLabels.namespace }}/{{ .CommonLabels.job }}"
)
ALERT_LINES = (
    "{{ range .Alerts }}*{{ .Labels.severity }}* {{ .Annotations.summary }}\n"
    "{{ .Annotations.description }}\n"
    "Runbook: {{ .Annotations.runbook_url }}\n{{ end }}"
)
EMAIL_SUBJECT = SLACK_TITLE


def _matcher(name: str, value: str, match_type: str = "=") -> dict[str, str]:
    return {"name": name, "value": value, "matchType": match_type}


def _secret(ref: Mapping[str, Any]) -> dict[str, str]:
    return {"name": str(ref["name"]), "key": str(ref["key"])}


def _severity_route(receiver: str, severities: list[str] | None) -> dict[str, Any]:
    route: dict[str, Any] = {"receiver": receiver, "continue": True}
    if severities:
        ordered = sorted(set(severities))
        route["matchers"] = [
            _matcher("severity", ordered[0]) if len(ordered) == 1 else _matcher("severity", "|".join(ordered), "=~")
        ]
    return route


def render_alertmanager_config_spec(
    *, name: str, namespace: str, notifications: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The `spec` of a monitoring.coreos.com/v1alpha1 AlertmanagerConfig, or None when nothing is configured.

    Secrets are referenced (SecretKeySelector), never copied.
    """
    notifications = notifications or {}
    receivers: list[dict[str, Any]] = [{"name": UNROUTED_RECEIVER}]
    routes: list[dict[str, Any]] = []

    slack = notifications.get("slack")
    if slack:
        receivers.append(
            {
                "name": "slack",
                "slackConfigs": [
                    {
                        "apiURL": _secret(slack["apiURLSecretRef"]),
                        "channel": str(slack["channel"]),
                        "sendResolved": True,
                        "title": SLACK_TITLE,
                        "text": ALERT_LINES,
                    }
                ],
            }
        )
        routes.append(_severity_route("slack", slack.get("severities")))

    email = notifications.get("email")
    if email:
        config: dict[str, Any] = {
            "to": ", ".join(email["to"]),
            "from": str(email["from"]),
            "smarthost": str(email["smarthost"]),
            "sendResolved": True,
            "headers": [{"key": "Subject", "value": EMAIL_SUBJECT}],
            "text": ALERT_LINES,
        }
        if email.get("authSecretRef"):
            config["authUsername"] = str(email.get("authUsername") or email["from"])
            config["authPassword"] = _secret(email["authSecretRef"])
        if "requireTLS" in email:
            config["requireTLS"] = bool(email["requireTLS"])
        receivers.append({"name": "email", "emailConfigs": [config]})
        routes.append(_severity_route("email", email.get("severities")))

    webhook = notifications.get("webhook")
    if webhook:
        receivers.append(
            {
                "name": "webhook",
                "webhookConfigs": [{"urlSecret": _secret(webhook["urlSecretRef"]), "sendResolved": True}],
            }
        )
        routes.append(_severity_route("webhook", webhook.get("severities")))

    if not routes:
        return None
    return {
        "route": {
            "receiver": UNROUTED_RECEIVER,
            # namespace: whatever the Prometheus Operator's matcher strategy (see the module docstring);
            # job and alertname keep another deployment's (or application's) alerts in it out.
            "matchers": [
                _matcher("namespace", namespace),
                _matcher("job", name),
                _matcher("alertname", "SLM.+", "=~"),
            ],
            "groupBy": list(GROUP_BY),
            # Timing from the resource (the CRD defaults to these constants); a test or demo shortens it.
            "groupWait": str(notifications.get("groupWait") or GROUP_WAIT),
            "groupInterval": str(notifications.get("groupInterval") or GROUP_INTERVAL),
            "repeatInterval": str(notifications.get("repeatInterval") or REPEAT_INTERVAL),
            "routes": routes,
        },
        "receivers": receivers,
        "inhibitRules": [
            {
                # A critical alert of this deployment mutes its warnings (e.g. the error-budget page
                # mutes SLMSlowResponseTime) so the on-call reads the cause, not every symptom.
                "sourceMatch": [
                    _matcher("severity", "critical"),
                    _matcher("namespace", namespace),
                    _matcher("job", name),
                ],
                "targetMatch": [
                    _matcher("severity", "warning"),
                    _matcher("namespace", namespace),
                    _matcher("job", name),
                ],
                "equal": ["namespace", "job"],
            }
        ],
    }
