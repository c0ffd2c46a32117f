"""The instrumented small-language-model inference server.

Layers (kserve-style): `engine` (the model) → `service` (admission, timeouts, metrics, logs, drift
signals) → `routers/` (thin HTTP per API) → `app.create_app` (wiring, lifespan). No global app.
"""

__version__ = "0.1.0"
