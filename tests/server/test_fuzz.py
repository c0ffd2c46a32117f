"""Fuzzing the OpenAPI document with schemathesis: no input gets a 5xx, nothing crashes the app.

Both valid (positive) and schema-violating (negative) requests are generated for every operation
of the document, sent to the app with the real tiny model, and every response is checked against
the document. max_new_tokens is lowered so random valid requests stay quick, and the examples are
bounded (and derandomized, so a failure reproduces) to keep the run well under a minute.

Driven through schemathesis' Python API rather than its pytest plugin, which does not run under
pytest 9 (`'Function' object has no attribute '_nodeid'`).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.python import asgi

from slm_server.app import create_app

from .conftest import settings_for

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}


@pytest.fixture(scope="module")
def fuzz_target(tiny_engine, tiny_model_dir):
    app = create_app(settings_for(tiny_model_dir, max_new_tokens=8), engine=tiny_engine, registry=CollectorRegistry())
    with asgi.get_client(app) as client:  # one lifespan for the whole run
        yield app, client


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_no_input_gets_a_server_error(fuzz_target, mode):
    app, client = fuzz_target
    operations = _operations(app)
    assert {op.path for op in operations} >= {"/generate", "/v1/completions", "/v1/chat/completions"}
    seen: list[int] = []
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # an operation without inputs has no invalid requests to make

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            response = case.call(session=client)
            seen.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {response.text[:300]}"
            )
            if mode is GenerationMode.POSITIVE:
                # Valid by the schema = no 422. A 400 is still right for what no schema can say
                # (a prompt longer than the context, max_tokens over the configured cap).
                assert response.status_code != 422, f"{case.body!r} -> {response.text[:300]}"
            excluded = [schemathesis.checks.positive_data_acceptance]
            if response.status_code == 413:  # too large for max_body_bytes: a rejection, the document says so
                excluded.append(schemathesis.checks.negative_data_rejection)
            case.validate_response(response, excluded_checks=excluded)

        check()
    assert app.state.service.ready  # still serving after all of it
    print(f"{mode.value}: {len(seen)} requests, statuses {sorted(set(seen))}")
