"""Monitoring content rendered per SLMDeployment: Prometheus rules, Grafana dashboards, Alertmanager routing.

Pure functions: spec in, plain dicts out. The operator wraps them into PrometheusRule, ConfigMap and
AlertmanagerConfig objects; tests feed them straight to promtool, Prometheus and Alertmanager.
"""
