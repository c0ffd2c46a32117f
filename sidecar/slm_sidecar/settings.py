"""The sidecar's settings: the built-in server's (`SLM_*`, slm_server.settings.Settings) — the request log
and its output policy, metrics, the admin listener and fault injection, the body cap and the request
deadline mean the same here — plus where the runtime is.

The server's model and engine settings (SLM_MODEL, SLM_ENGINE, SLM_DEVICE, SLM_MAX_CONCURRENT_REQUESTS…)
have no effect on the sidecar: the runtime owns the model. SLM_SERVED_MODEL_NAME names it in the `model`
label and the log lines, as the operator sets it for the runtime's own `--served-model-name`.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from slm_server.settings import Settings

Runtime = Literal["openai", "builtin", "vllm", "sglang", "tgi", "llamacpp"]


class SidecarSettings(Settings):
    """Everything the sidecar can be told (environment `SLM_*`)."""

    model_config = SettingsConfigDict(env_prefix="SLM_", extra="ignore", frozen=True)

    upstream_url: str = Field(
        "http://127.0.0.1:8080",
        description="The runtime's base URL (http, host and port): in a pod, its port on loopback. Requests go to "
        "its OpenAI routes.",
    )
    upstream_health_path: str = Field(
        "/health",
        description="The runtime's readiness endpoint; the sidecar's /readyz answers what it answers "
        "(vLLM, SGLang, TGI and llama.cpp: /health; the built-in server: /readyz).",
    )
    upstream_connect_timeout_seconds: float = Field(
        2.0, gt=0, description="Connecting to the runtime; a runtime that does not accept in time gets 503."
    )
    runtime: Runtime = Field(
        "openai",
        description="Which runtime answers (the operator sets it): how a reply looks without log-probabilities "
        "(`logprobs: null`, or no `logprobs` key: llama.cpp's chat completions) so that the fields the sidecar "
        "asked for are taken out exactly. `openai`: as OpenAI's API, `logprobs: null`.",
    )
    quality_logprobs: bool = Field(
        True,
        description="Ask the runtime for the sampled tokens' log-probabilities when the client did not (and "
        "take them out of the reply): slm_request_perplexity and the perplexity drift signal need them. Off: "
        "requests pass unchanged, and those series stay empty.",
    )

    @model_validator(mode="after")
    def _upstream_is_a_url(self) -> SidecarSettings:
        parts = urlsplit(self.upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"SLM_UPSTREAM_URL={self.upstream_url!r} is not an http URL with a host (e.g. http://127.0.0.1:8080; "
                "the runtime is on the pod's loopback, where TLS protects nothing)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"SLM_UPSTREAM_URL={self.upstream_url!r}: only scheme, host and port")
        if not self.upstream_health_path.startswith("/"):
            raise ValueError(f"SLM_UPSTREAM_HEALTH_PATH={self.upstream_health_path!r} must start with /")
        return self

    @property
    def upstream_base(self) -> str:
        return self.upstream_url.rstrip("/")

    @property
    def upstream_address(self) -> tuple[str, int]:
        parts = urlsplit(self.upstream_url)
        assert parts.hostname is not None
        return parts.hostname, parts.port or 80
