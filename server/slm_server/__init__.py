"""The instrumented small-language-model inference server.

Layers (kserve-style): `generation/` (the model: engines, scheduler, sampling) → `service/` (admission,
jobs, streaming, accounting: timeouts, metrics, logs, drift signals) → `routers/` (thin HTTP per API)
→ `app.create_app` (wiring, lifespan). No global app. Only the engine modules of `generation/` need
torch; the rest (the app, its middleware, metrics, logs and drift detection) imports without it.
"""

__version__ = "0.1.0"
