"""Server settings: environment variables `SLM_*` (the operator sets them from the CR), or CLI flags."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

OutputLogPolicy = Literal["none", "hash", "truncated", "full"]


class Settings(BaseSettings):
    """Everything the server can be told. Defaults are production-safe (faults off, outputs hashed)."""

    model_config = SettingsConfigDict(env_prefix="SLM_", extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------------------
    model: str = Field(
        "",
        description="A Hugging Face model directory or hub id (required by the transformers engine).",
    )
    served_model_name: str | None = Field(
        None,
        description="Name in the API and the `model` label.",
        validation_alias=AliasChoices("served_model_name", "SLM_SERVED_MODEL_NAME", "SLM_MODEL_NAME"),
    )
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) of a hub id.",
        validation_alias=AliasChoices("revision", "SLM_REVISION", "SLM_MODEL_REVISION"),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on a GPU that supports it, else float16; float32 on a CPU."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    engine: Literal["transformers", "echo"] = Field(
        "transformers", description="`echo` is a no-op engine for HTTP/metrics benchmarks."
    )
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code (off: safe).")

    # --- serving -----------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Listen address (all interfaces in a pod).")  # noqa: S104
    port: int = Field(8000, ge=1, le=65535, description="Listen port: the API, the probes and /metrics.")
    max_new_tokens: int = Field(512, ge=1, description="Cap on max_tokens per request.")
    default_max_tokens: int = Field(
        64, ge=1, description="max_tokens of /generate and chat completions when a request leaves it out."
    )
    max_concurrent_requests: int = Field(8, ge=1, description="Generations running at once.")
    max_batch_size: int = Field(
        0,
        ge=0,
        description="Generations that share one forward pass (continuous batching); 0 = max_concurrent_requests, "
        "1 = one generation at a time. Running generations beyond it wait for a place (in their time to first token).",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="Prompt tokens fed in one forward pass (padding included, over the prompts prefilled together). "
        "A longer prefill takes several passes, each followed by a decode step of the running generations "
        "(chunked prefill), so a long prompt delays their next token by one chunk's pass, not its whole prefill. "
        "0 = each prefill in one pass.",
    )
    prefix_cache_mib: int = Field(
        512,
        ge=0,
        description="Memory for prompt prefixes' KV caches, in MiB (prefix caching): a prompt that begins with "
        "the blocks of 16 tokens of an earlier one (a system prompt, the conversation so far) feeds only its other "
        "tokens. 0 = off. Models with sliding-window attention (Phi-3, Mistral) run without it.",
    )
    max_queued_requests: int = Field(
        32,
        ge=0,
        description="Waiting beyond that; more get 429.",
        validation_alias=AliasChoices("max_queued_requests", "SLM_MAX_QUEUED_REQUESTS", "SLM_MAX_QUEUE"),
    )
    request_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="From arrival: reading the body (then 408), preparing the prompt, the queue and the generation "
        "(then 504).",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open connections (idle keep-alive ones included) and requests in progress the server takes at "
        "once; beyond it a request gets 503 (uvicorn's limit_concurrency).",
    )
    grammar_compile_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A response_format, tool or structured_outputs grammar that takes longer to compile gets 400 "
        "(llguidance's own limits bound the work too).",
    )
    drain_timeout_seconds: float = Field(30.0, ge=0, description="Graceful shutdown waits this long.")

    # --- observability -------------------------------------------------------------------------------
    metrics_enabled: bool = Field(
        True, description="Off = no metrics and no /metrics (benchmarks); request lines follow log_requests."
    )
    gpu_metrics: bool = Field(True, description="Export nvidia_gpu_* series from pynvml when a GPU is present.")
    disk_paths: str = Field(
        "",
        description="Comma-separated paths whose filesystem free/size bytes are exported (/data in a pod); "
        "empty = the loaded model's directory.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level written.")
    log_requests: bool = Field(True, description="One JSON line per API request (the access line).")
    log_probes: bool = Field(False, description="Also log /healthz, /readyz, /metrics requests.")
    log_outputs: OutputLogPolicy = Field(
        "hash",
        description="What of each output goes into its request line: none, hash (HMAC-SHA256 + length), "
        "truncated (the first log_truncate_chars characters), full. Prompts are never logged.",
    )
    log_sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests whose output is logged.")
    log_truncate_chars: int = Field(200, ge=1, description="Characters kept by log_outputs=truncated.")
    output_hash_key: SecretStr | None = Field(
        None,
        description="The key of log_outputs=hash's HMAC-SHA256 (from a Secret): the same key gives the same hash "
        "on every replica and after restarts. Unset: a random key per process, so hashes are comparable only "
        "within one process's lifetime (the model_loaded line says which).",
    )
    log_flush_interval_seconds: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="Log lines are written in batches of 32, and at least this often (warnings and errors at once); "
        "0 = every line.",
    )

    # --- fault injection (alert tests, the demo) — off unless set here, never from a request ---------
    fault_injection: bool = Field(False, description="Allow the fault_* settings (alert tests, the demo).")
    fault_error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests failing with 500.")
    fault_latency_seconds: float = Field(0.0, ge=0.0, description="Added to every generation.")
    fault_degraded_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests whose tokens are sampled uniformly (garbage)."
    )
    fault_admin_api: bool = Field(
        False,
        description="Serve /admin/faults on the admin listener (admin_host:admin_port, never the serving port) to "
        "change the faults at run time (implies fault_injection).",
        validation_alias=AliasChoices("fault_admin_api", "SLM_FAULT_ADMIN_API", "SLM_FAULTS_ADMIN"),
    )
    admin_host: str = Field(
        "",
        description="The admin listener's address; empty = loopback (reachable from inside the pod only): "
        "127.0.0.1, or the serving host when that is a loopback address itself. Any other address needs admin_token.",
    )
    admin_port: int = Field(8001, ge=1, le=65535, description="The admin listener's port (fault_admin_api).")
    admin_token: SecretStr | None = Field(
        None,
        description="When set, every admin request needs `Authorization: Bearer <token>` (others get 401).",
    )

    @model_validator(mode="before")
    @classmethod
    def _admin_api_is_an_opt_in(cls, data: Any) -> Any:
        # SLM_FAULTS_ADMIN=true (the operator's spec.server.faultsAdmin) is itself the explicit opt-in.
        if isinstance(data, dict):
            admin = next(
                (data[k] for k in ("fault_admin_api", "SLM_FAULT_ADMIN_API", "SLM_FAULTS_ADMIN") if k in data), None
            )
            if str(admin).lower() in ("1", "true", "yes", "on") and "fault_injection" not in data:
                data = {**data, "fault_injection": True}
        return data

    @model_validator(mode="after")
    def _faults_need_opt_in(self) -> Settings:
        knobs = self.fault_error_rate or self.fault_latency_seconds or self.fault_degraded_rate
        if (knobs or self.fault_admin_api) and not self.fault_injection:
            raise ValueError("fault_* settings need fault_injection=true (SLM_FAULT_INJECTION=true)")
        return self

    @model_validator(mode="after")
    def _admin_listener_is_private(self) -> Settings:
        if not self.fault_admin_api:
            return self
        if self.admin_port == self.port:
            raise ValueError(f"SLM_ADMIN_PORT must differ from the serving port ({self.port})")
        if self.admin_token is None and not _is_loopback(self.admin_address):
            raise ValueError(
                f"SLM_ADMIN_HOST={self.admin_address} is reachable from other hosts: set SLM_ADMIN_TOKEN, or listen on "
                "127.0.0.1"
            )
        return self

    @property
    def admin_address(self) -> str:
        """Where the admin listener listens: admin_host, else loopback (the serving host when it is a
        loopback address: several servers on one machine, each on its own 127.x address, do not collide)."""
        if self.admin_host:
            return self.admin_host
        return self.host if _is_loopback(self.host) else "127.0.0.1"

    @property
    def disk_path_list(self) -> list[str]:
        return [p.strip() for p in self.disk_paths.split(",") if p.strip()]

    @property
    def model_name(self) -> str:
        """The served model name: explicit, else the last part of the path or hub id."""
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] or "model"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
