"""slm-sidecar: the monitoring sidecar that gives a third-party runtime (vLLM, SGLang, TGI, llama.cpp) the
built-in server's request log, output-quality metrics and drift detection, without touching the runtime."""

__version__ = "0.1.0"
