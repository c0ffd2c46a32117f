"""kopf entry point (`kopf run -m slm_operator.main`): decorators only, each delegating to slm_operator.handlers."""

from __future__ import annotations

from typing import Any

import kopf

from slm_operator import GROUP, PLURAL, VERSION, metrics
from slm_operator.handlers import lifecycle
from slm_operator.handlers.lifecycle import CHILD_RESOURCES, CHILD_SELECTOR

CHILD_LABELS = {CHILD_SELECTOR.split("=")[0]: CHILD_SELECTOR.split("=")[1]}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Tune kopf, build the shared state from memo.config, start the metrics server and the periodic resync."""
    lifecycle.configure(settings, memo)
    lifecycle.start_resync(memo)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the periodic resync."""
    await lifecycle.cleanup(memo)


@kopf.on.probe(id="reconciles")
def probe_reconciles(**_: Any) -> float:
    """Liveness detail: reconciles done so far (kopf serves /healthz)."""
    return metrics.reconciles_total()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_slmdeployment(body: kopf.Body, reason: str, memo: kopf.Memo, **_: Any) -> None:
    """Render and apply the children of an SLMDeployment, then write its status."""
    lifecycle.on_slmdeployment_change(memo.state, dict(body), str(reason))


@kopf.on.event(GROUP, VERSION, PLURAL)
def slmdeployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An SLMDeployment was deleted: drop what the operator kept for it."""
    lifecycle.on_slmdeployment_event(memo.state, type, dict(body))


def child_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A child was added, changed or deleted: repair it or refresh the parent's status."""
    lifecycle.child_event(memo.state, type, dict(body))


for _api_version, _plural in CHILD_RESOURCES:
    # One event handler per child kind, watched with the managed-by label selector (set in startup).
    kopf.on.event(_api_version, _plural, labels=CHILD_LABELS, id=f"child-{_plural}")(child_changed)
