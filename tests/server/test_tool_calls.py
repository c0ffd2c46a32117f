"""Tool calls (OpenAI's `tools` and `tool_choice`) on the real tiny model: the calls a client gets
follow the tools' schemas, round trips of calls and results are taken, and what cannot be served is
refused saying why."""

from __future__ import annotations

import json

import jsonschema
import pytest

from slm_server.protocol import ChatMessage
from slm_server.tool_calls import template_messages

from .conftest import MODEL_NAME, serve, settings_for, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
COUNT = {
    "type": "function",
    "function": {
        "name": "count_files",
        "parameters": {
            "type": "object",
            "properties": {"recursive": {"type": "boolean"}, "depth": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["recursive", "depth"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, COUNT)}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


# A chat template that renders tools, calls and results, as tool-trained models' templates do.
TOOL_TEMPLATE = (
    "{% if tools %}Tools: {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.tool_call_id %}[result of {{ m.tool_call_id }}]{% endif %}\n{% endfor %}assistant:"
)


def _chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Is it cold in Oslo?"}], **fields}


def _assert_calls_follow_their_tools(message: dict) -> list[dict]:
    assert message["content"] is None
    calls = message["tool_calls"]
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert len({call["id"] for call in calls}) == len(calls)
    return calls


def _tool_outputs(server, result: str) -> float:
    labels = {"model": MODEL_NAME, "format": "tool_call", "result": result}
    return server.metric("slm_structured_outputs_total", labels) or 0.0


def test_a_named_tool_choice_calls_that_function_with_arguments_that_follow_its_schema(server):
    r = server.client.post("/v1/chat/completions", json=_chat(tools=[WEATHER, COUNT], tool_choice=NAMED, n=3, seed=1))
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        calls = _assert_calls_follow_their_tools(choice["message"])
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert choice["finish_reason"] == "tool_calls"
    assert _tool_outputs(server, "complete") == 3


def test_required_makes_calls_of_the_given_tools_and_one_without_parallel_calls(server):
    seen_names = set()
    for seed in range(6):
        body = _chat(tools=[WEATHER, COUNT], tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        r = server.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "length":  # a sampled array of calls may run past max_tokens
            continue
        seen_names |= {c["function"]["name"] for c in _assert_calls_follow_their_tools(choice["message"])}
    assert seen_names  # at least one sampled array of calls ended whole
    single = _chat(tools=[WEATHER, COUNT], tool_choice="required", parallel_tool_calls=False, temperature=0)
    calls = _assert_calls_follow_their_tools(
        server.client.post("/v1/chat/completions", json=single).json()["choices"][0]["message"]
    )
    assert len(calls) == 1


def test_tool_calls_stream_as_openai_chunks_that_add_up_to_the_whole_reply(server):
    body = _chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0, logprobs=True)
    whole = server.client.post("/v1/chat/completions", json=body).json()["choices"][0]
    events, _ = sse_events(server.client, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    (with_calls,) = [e["choices"][0] for e in events if e["choices"] and "tool_calls" in e["choices"][0]["delta"]]
    assert with_calls["logprobs"] == whole["logprobs"]  # every token's, with the calls
    assert deltas[0] == {"role": "assistant", "content": ""}
    streamed = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]) for c in streamed] == [
        (i, c["function"]) for i, c in enumerate(whole["message"]["tool_calls"])
    ]
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_calls_cut_short_come_back_as_text_with_the_reason_that_cut_them(server):
    r = server.client.post("/v1/chat/completions", json=_chat(tools=[WEATHER], tool_choice=NAMED, max_tokens=3))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"] is None
    assert choice["message"]["content"].startswith('{"')
    assert _tool_outputs(server, "incomplete") == 1


def test_tool_choice_none_answers_in_text_without_showing_the_tools(own_engine, tiny_model_dir):
    engine = own_engine()
    engine.tokenizer.chat_template = TOOL_TEMPLATE
    with serve(engine, settings_for(tiny_model_dir)) as server:

        def chat(**fields) -> dict:
            return server.client.post("/v1/chat/completions", json=_chat(max_tokens=4, temperature=0, **fields)).json()

        plain, none, named = chat(), chat(tools=[WEATHER], tool_choice="none"), chat(tools=[WEATHER], tool_choice=NAMED)
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert named["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the template showed the tool


def test_the_tools_and_a_round_trip_of_calls_and_results_reach_the_chat_template(own_engine, tiny_model_dir):
    """A template that renders tools, calls and results (as tool-trained models' do) sees all three."""
    engine = own_engine()
    engine.tokenizer.chat_template = TOOL_TEMPLATE
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "Is it cold in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
    ]
    with serve(engine, settings_for(tiny_model_dir)) as server:
        r = server.client.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": messages, "tools": [WEATHER, COUNT], "tool_choice": NAMED},
        )
        assert r.status_code == 200, r.text
        _assert_calls_follow_their_tools(r.json()["choices"][0]["message"])
        # /tokenize counts the same prompt, tools and round trip included.
        counted = server.client.post("/tokenize", json={"messages": messages, "tools": [WEATHER, COUNT]}).json()
        assert counted["count"] == r.json()["usage"]["prompt_tokens"]
        without = server.client.post("/tokenize", json={"messages": messages}).json()
        assert without["count"] < counted["count"]
    rendered = engine.tokenizer.decode(
        engine.encode_chat(template_messages([ChatMessage(**m) for m in messages]), [WEATHER, COUNT])
    )
    assert rendered.startswith("Tools: get_weather,count_files\n")
    assert "assistant: [call get_weather Oslo]" in rendered  # the arguments reach the template as an object
    assert "tool: -3 C[result of call_1]" in rendered


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"tools": [WEATHER]}, "tool_choice", 'tool_choice "auto" (the default when tools are given) is not supported'),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", 'Ask for "required"'),
        ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "names the function `nope`, which is not in tools"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "two tools have the same name"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "give one"),
        ({"tools": [WEATHER], "tool_choice": "required", "structured_outputs": {"regex": "a+"}}, "tool_choice",
         "give one"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
          "tool_choice": "required"}, "tools", "tools: "),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
    ],
)  # fmt: skip
def test_tool_requests_that_cannot_be_served_are_refused_saying_why(server, fields, param, says):
    r = server.client.post("/v1/chat/completions", json=_chat(max_tokens=8, **fields))
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert says in error["message"]
    assert (error["param"] or "").startswith(param)


def test_a_stop_string_that_cuts_structured_output_counts_it_incomplete(server):
    r = server.client.post(
        "/v1/chat/completions",
        json=_chat(tools=[WEATHER], tool_choice=NAMED, stop=["}"], temperature=0, max_tokens=60),
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"] is None
    assert "}" not in choice["message"]["content"]
    assert _tool_outputs(server, "incomplete") == 1 and _tool_outputs(server, "complete") == 0
