"""Structured output (OpenAI's `response_format`) on the real tiny model: the JSON a client gets
follows its schema, the choice is constrained and nothing else (log-probabilities, other generations
in the batch), and bad schemas are refused saying why."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from slm_server.generation.echo_engine import EchoEngine
from slm_server.generation.types import SamplingParams

from .conftest import MODEL_NAME, REPO_ROOT, assert_same_generation, generate_together, serve, settings_for, sse_events

VERDICT = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "unsure"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "count", "sure"],
    "additionalProperties": False,
}
FREE_TEXT = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}


def _chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Is the file empty?"}], **fields}


def _grammar(engine, schema: dict):
    grammars = engine.grammars
    return grammars.compile(grammars.key("json_schema", schema, "schema"), "json_schema", schema, "schema")


def _outputs(server, structured: str, result: str) -> float:
    labels = {"model": MODEL_NAME, "format": structured, "result": result}
    return server.metric("slm_structured_outputs_total", labels) or 0.0


def test_every_sampled_choice_is_json_that_follows_the_schema(server):
    r = server.client.post(
        "/v1/chat/completions",
        json=_chat(n=6, temperature=1.0, seed=11, max_tokens=60, response_format=_format(VERDICT)),
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for choice in choices:
        document = json.loads(choice["message"]["content"])
        jsonschema.validate(document, VERDICT)
        assert choice["finish_reason"] == "stop"  # it ends as soon as the JSON is complete
    assert len({c["message"]["content"] for c in choices}) > 1  # each choice samples on its own
    assert _outputs(server, "json_schema", "complete") == 6


def test_json_written_as_json_dumps_writes_it_and_streamed_as_it_is_returned(server):
    body = _chat(temperature=0, max_tokens=60, response_format=_format(VERDICT))
    whole = server.client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert whole == json.dumps(json.loads(whole))  # `{"answer": "no", ...}`: no other whitespace
    events, _ = sse_events(server.client, "/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == whole
    generated = server.client.post(
        "/generate", json={"prompt": "Is the file empty?", "temperature": 0, "max_tokens": 60,
                           "response_format": _format(VERDICT)}
    ).json()  # fmt: skip
    jsonschema.validate(json.loads(generated["text"]), VERDICT)


def test_json_object_composes_with_logit_bias(server):
    """`json_object` allows any object; a bias toward `}` (allowed only where the object may close)
    closes it at once."""
    close = server.client.post("/tokenize", json={"prompt": "}"}).json()["tokens"]
    assert len(close) == 1
    r = server.client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "The list", "max_tokens": 20, "temperature": 0,
              "logit_bias": {str(close[0]): 100}, "response_format": {"type": "json_object"}},
    )  # fmt: skip
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("{}", "stop")
    assert _outputs(server, "json_object", "complete") == 1


def test_output_cut_short_is_a_prefix_of_the_json_and_counted_incomplete(server):
    r = server.client.post(
        "/v1/chat/completions", json=_chat(temperature=0, max_tokens=8, response_format=_format(FREE_TEXT))
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith('{"summary')
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])
    assert _outputs(server, "json_schema", "incomplete") == 1
    assert _outputs(server, "json_schema", "complete") == 0


def test_the_grammar_changes_the_choice_never_the_reported_log_probabilities(tiny_engine):
    """The log-probabilities (and so the perplexity) are the model's own: those of a teacher-forced
    pass over the same tokens, not of the masked distribution."""
    ids = tiny_engine.encode("The answer is")
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=0, grammar=_grammar(tiny_engine, VERDICT))
    result = tiny_engine.generate(ids, params)
    jsonschema.validate(json.loads(result.text), VERDICT)
    forced, _ = tiny_engine.score(ids + result.token_ids, 0)
    assert result.token_logprobs == pytest.approx(forced[len(ids) :], rel=1e-3, abs=1e-4)
    free = tiny_engine.generate(ids, SamplingParams(max_tokens=len(result.token_ids), temperature=0))
    assert free.text != result.text  # left alone, the model writes no such JSON


def test_a_structured_generation_in_a_batch_leaves_the_others_unchanged(tiny_engine):
    plain = SamplingParams(max_tokens=24, temperature=0, logprobs=0)
    structured = SamplingParams(max_tokens=40, temperature=0.8, seed=5, logprobs=0,
                                grammar=_grammar(tiny_engine, VERDICT))  # fmt: skip
    jobs = [("Return the number of", plain), ("Is the list empty?", structured), ("The file", plain),
            ("Is the file empty?", structured)]  # fmt: skip
    alone = [tiny_engine.generate(tiny_engine.encode(prompt), params) for prompt, params in jobs]
    together = generate_together(tiny_engine, jobs)
    for result, expected in zip(together, alone, strict=True):
        assert_same_generation(result, expected)
    for result in together[1::2]:
        jsonschema.validate(json.loads(result.text), VERDICT)


def test_degraded_output_faults_still_follow_the_schema(tiny_engine, tiny_model_dir):
    """Fault injection's degraded output samples uniformly, but among the tokens the grammar allows."""
    settings = settings_for(tiny_model_dir, fault_injection=True, fault_degraded_rate=1.0)
    with serve(tiny_engine, settings) as server:
        r = server.client.post("/v1/chat/completions", json=_chat(n=3, max_tokens=80, response_format=_format(VERDICT)))
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), VERDICT)


def test_the_same_schema_is_compiled_once(server, tiny_engine, monkeypatch):
    grammars = tiny_engine.grammars
    compiled = []
    compile_ = grammars.compile
    monkeypatch.setattr(grammars, "compile", lambda *args: compiled.append(args[1:]) or compile_(*args))
    schema = {**VERDICT, "title": "asked twice"}
    for asked in (schema, dict(reversed(list(schema.items()))), {**schema, "title": "another"}):
        r = server.client.post("/v1/chat/completions", json=_chat(max_tokens=30, response_format=_format(asked)))
        assert r.status_code == 200
    assert [args[1]["title"] for args in compiled] == ["asked twice", "another"]


def test_the_request_line_says_the_output_was_json(server, json_records):
    server.client.post("/v1/chat/completions", json=_chat(max_tokens=30, response_format=_format(VERDICT)))
    server.client.post("/v1/chat/completions", json=_chat(max_tokens=2, response_format={"type": "text"}))
    server.client.post("/v1/chat/completions", json=_chat(max_tokens=9, structured_outputs={"choice": ["a", "b"]}))
    lines = [d for d in json_records("request") if d.get("http.route") == "/v1/chat/completions"]
    assert [d.get("gen_ai.output.type") for d in lines] == ["json", None, "text"]


@pytest.mark.parametrize(
    ("response_format", "status", "says"),
    [
        (_format({"type": "frobnicate"}), 400, "response_format.json_schema.schema: Invalid type: frobnicate"),
        (_format({"type": "string", "pattern": "(unclosed"}), 400, "response_format.json_schema.schema: "),
        ({"type": "xml"}, 422, "response_format: Input tag 'xml'"),
        ({"type": "json_schema", "json_schema": {"name": "v"}}, 422, "response_format.json_schema.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, 422, "name"),
        ({"type": "json_schema", "json_schema": {"name": "v", "schema": []}}, 422, "schema"),
    ],
)
def test_bad_response_formats_are_refused_saying_why(server, response_format, status, says):
    r = server.client.post("/v1/chat/completions", json=_chat(max_tokens=4, response_format=response_format))
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
    assert server.client.get("/readyz").status_code == 200


def test_an_engine_without_structured_output_refuses_it(tiny_model_dir):
    """EchoEngine (the no-op engine of the benchmarks) has no tokenizer to compile a grammar with."""
    with serve(EchoEngine(), settings_for(tiny_model_dir)) as server:
        r = server.client.post("/v1/chat/completions", json=_chat(response_format={"type": "json_object"}))
        assert r.status_code == 400
        assert "has no structured output" in r.json()["error"]["message"]
        assert (
            server.client.post("/v1/chat/completions", json=_chat(response_format={"type": "text"})).status_code == 200
        )


def test_the_documented_request_gets_json_that_follows_its_schema(server):
    """docs/structured-output.md's example body, as written (but for the model's name)."""
    page = (REPO_ROOT / "docs" / "structured-output.md").read_text()
    body = json.loads(re.search(r"```json\n(.*?)```", page, re.DOTALL)[1])
    r = server.client.post("/v1/chat/completions", json={**body, "model": MODEL_NAME, "max_tokens": 40})
    assert r.status_code == 200, r.text
    schema = body["response_format"]["json_schema"]["schema"]
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def _schemas():
    """Schema-like objects: real keywords with values of the right and of the wrong kinds, nested."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.text(max_size=6))
    leaf = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "frob"])}),
        st.fixed_dictionaries({"enum": st.lists(scalars, min_size=1, max_size=4)}),
        st.fixed_dictionaries({"const": scalars}),
        st.fixed_dictionaries(
            {"type": st.just("string")},
            optional={
                "maxLength": st.integers(0, 8),
                "minLength": st.integers(0, 4),
                "pattern": st.sampled_from(["^[a-z]+$", "[0-9]{2}", "(", "a|b"]),
                "format": st.sampled_from(["date", "email", "uuid", "nonsense"]),
            },
        ),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["integer", "number"])},
            optional={"minimum": st.integers(-5, 5), "maximum": st.integers(-5, 50), "multipleOf": st.integers(1, 5)},
        ),
    )

    def nest(children):
        return st.one_of(
            st.fixed_dictionaries(
                {
                    "type": st.just("object"),
                    "properties": st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
                },
                optional={
                    "required": st.lists(st.sampled_from("abcdz"), max_size=3, unique=True),
                    "additionalProperties": st.booleans(),
                },
            ),
            st.fixed_dictionaries(
                {"type": st.just("array"), "items": children},
                optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 3)},
            ),
            st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
            st.fixed_dictionaries({"allOf": st.lists(children, min_size=1, max_size=2)}),
        )

    return st.recursive(leaf, nest, max_leaves=6)


def test_random_schemas_get_json_that_follows_them_or_a_400_never_a_server_error(tiny_engine, tiny_model_dir):
    """Any schema: a 400 that names it, or a 200 whose output, when it ended as complete JSON, the
    schema accepts (checked by the `jsonschema` library, not by llguidance)."""
    seen: dict[str, int] = {}
    with serve(tiny_engine, settings_for(tiny_model_dir)) as server:

        @given(schema=_schemas(), seed=st.integers(0, 1000))
        @examples(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(schema, seed):
            body = {"model": MODEL_NAME, "prompt": "The value is", "max_tokens": 24, "temperature": 1.0, "seed": seed,
                    "response_format": _format(schema)}  # fmt: skip
            r = server.client.post("/v1/completions", json=body)
            assert r.status_code in (200, 400), (schema, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["param"] == "response_format.json_schema.schema"
                seen["refused"] = seen.get("refused", 0) + 1
                return
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "stop":
                jsonschema.validate(json.loads(choice["text"]), schema)
                seen["complete"] = seen.get("complete", 0) + 1
            else:
                seen["cut short"] = seen.get("cut short", 0) + 1

        check()
        assert server.client.get("/readyz").status_code == 200
    print(f"random schemas: {seen}")
    assert seen.get("complete", 0) >= 10 and seen.get("refused", 0) >= 5  # both ways were exercised


def test_the_drift_hook_is_told_which_generations_were_structured(tiny_engine, tiny_model_dir):
    seen = []

    class Observer:
        def observe(self, signals) -> None:
            seen.append((signals.endpoint, signals.structured))

    with serve(tiny_engine, settings_for(tiny_model_dir), signals=Observer()) as server:
        server.client.post("/v1/chat/completions", json=_chat(max_tokens=40, response_format=_format(VERDICT)))
        server.client.post("/v1/chat/completions", json=_chat(max_tokens=4))
        server.client.post(
            "/generate", json={"prompt": "x", "max_tokens": 30, "response_format": {"type": "json_object"}}
        )
    assert seen == [("/v1/chat/completions", True), ("/v1/chat/completions", False), ("/generate", True)]


def test_structured_outputs_stay_out_of_the_model_behaviour_histograms(server):
    """The perplexity and output-length histograms (which the drift alerts read) count free text only:
    a schema's forced tokens and length say nothing of the model's drift. The seed's histogram and
    the token counters count every generation."""
    labels = {"model": MODEL_NAME, "endpoint": "/v1/chat/completions"}

    def counts() -> tuple[float | None, ...]:
        return (
            server.metric("slm_request_perplexity_count", labels),
            server.metric("slm_request_output_tokens_count", labels),
            server.metric("model_output_tokens_count", {"endpoint": "/v1/chat/completions"}),
            server.metric("slm_generation_tokens_total", labels),
        )

    server.client.post(
        "/v1/chat/completions", json=_chat(max_tokens=40, temperature=0, response_format=_format(VERDICT))
    )
    structured = counts()
    assert structured[:3] == (0, 0, 1) and (structured[3] or 0) > 0
    server.client.post("/v1/chat/completions", json=_chat(max_tokens=4))
    assert counts()[:3] == (1, 1, 2)


def test_vllm_structured_outputs_choice_regex_grammar_and_json_hold_the_output(server):
    """vLLM's `structured_outputs` (sent as `extra_body` by the openai client): each kind holds the
    whole output, sampled, on every route."""
    labels = ["positive", "negative", "mixed feelings"]

    def outputs(constraint: dict, n: int = 4) -> list[str]:
        body = _chat(n=n, temperature=1.0, seed=2, max_tokens=40, structured_outputs=constraint)
        r = server.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert all(c["finish_reason"] == "stop" for c in choices)
        return [c["message"]["content"] for c in choices]

    assert set(outputs({"choice": labels})) <= set(labels)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", o) for o in outputs({"regex": "[0-9]{3}-[a-z]{2}"}))
    assert set(outputs({"grammar": 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]/'})) <= {
        "yes", "no", *(f"maybe {d}" for d in range(10))
    }  # fmt: skip
    for document in outputs({"json": VERDICT}):
        jsonschema.validate(json.loads(document), VERDICT)
    r = server.client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "The answer:", "max_tokens": 10, "structured_outputs": {"choice": labels}},
    )
    assert r.json()["choices"][0]["text"] in labels
    r = server.client.post(
        "/generate", json={"prompt": "x", "max_tokens": 10, "structured_outputs": {"regex": "[ab]{4}"}}
    )
    assert re.fullmatch("[ab]{4}", r.json()["text"])
    for structured in ("regex", "choice", "grammar", "json_schema"):
        assert _outputs(server, structured, "complete") > 0


@pytest.mark.parametrize(
    ("structured_outputs", "extra", "status", "param", "says"),
    [
        ({"regex": "(unclosed"}, {}, 400, "structured_outputs.regex", "structured_outputs.regex: "),
        ({"grammar": "start: undefined_rule"}, {}, 400, "structured_outputs.grammar", "structured_outputs.grammar: "),
        ({"json": {"type": "frob"}}, {}, 400, "structured_outputs.json", "Invalid type: frob"),
        ({"choice": []}, {}, 422, "structured_outputs", "structured_outputs"),
        ({"regex": "a", "choice": ["a"]}, {}, 422, "structured_outputs", "structured_outputs"),
        ({"regex": "a"}, {"response_format": {"type": "json_object"}}, 400, "structured_outputs", "give one"),
    ],
)
def test_bad_structured_outputs_are_refused_saying_why(server, structured_outputs, extra, status, param, says):
    r = server.client.post(
        "/v1/chat/completions", json=_chat(max_tokens=4, structured_outputs=structured_outputs, **extra)
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and (error["param"] or "").startswith(param)
