"""slm-monitoring's Kubernetes operator: SLMDeployment → serving pods plus their monitoring."""

GROUP = "slm.dev"
VERSION = "v1alpha1"
KIND = "SLMDeployment"
PLURAL = "slmdeployments"
