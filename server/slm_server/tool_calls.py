"""Tool calls on /v1/chat/completions: OpenAI's `tools` and `tool_choice`, held to the tools' schemas.

The tools go to the model's chat template (`tools=`, as transformers defines it), so a model trained
for tool use sees them in its own format. What comes back is made a call by structured output
(slm_server.generation.structured), the way vLLM serves `required` and named tool choices:

- `tool_choice: {"type": "function", "function": {"name": N}}`: the output is the arguments of N,
  held to N's `parameters` schema;
- `tool_choice: "required"`: the output is a JSON array of calls, `[{"name": ..., "parameters": {...}}]`,
  each call held to its tool's schema (one call at most with `parallel_tool_calls: false`);
- `tool_choice: "none"`: plain text, and the tools are not shown to the model.

`"auto"` (OpenAI's default when tools are given) would need the model's own tool-call format parsed
out of free text, which differs per model family (vLLM asks for `--tool-call-parser`): it is refused
with a 400 that says which choices work, rather than ignored.

A call whose JSON was cut short (max_tokens, a timeout) cannot be parsed: the reply is then its raw
text as `content`, with the finish reason that cut it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slm_server.errors import InvalidInput
from slm_server.generation.types import GenerationResult
from slm_server.protocol import FunctionCall, ToolCall

FORMAT = "tool_call"  # slm_structured_outputs_total{format}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a request's output becomes calls: the schema it is held to, and the named function (None
    for `required`'s array of calls)."""

    schema: dict[str, Any]
    function: str | None


def plan(tools: list[Any] | None, tool_choice: Any, parallel: bool) -> ToolPlan | None:
    """The plan of a chat request; None when it asks for plain text. InvalidInput when it asks for
    what cannot be served."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return None
    if not tools:
        raise InvalidInput("tool_choice needs tools: the request gives none", param="tool_choice")
    by_name = {tool.function.name: tool.function for tool in tools}
    if len(by_name) < len(tools):
        raise InvalidInput("tools: two tools have the same name", param="tools")
    if tool_choice == "auto":
        raise InvalidInput(
            'tool_choice "auto" (the default when tools are given) is not supported: it needs the model\'s own '
            'tool-call format parsed from free text. Ask for "required", or {"type": "function", "function": '
            '{"name": ...}}: the server holds those calls to the tools\' schemas. "none" asks for text.',
            param="tool_choice",
        )
    if tool_choice == "required":
        calls = {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"const": name}, "parameters": function.parameters},
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for name, function in by_name.items()
                ]
            },
        }
        if not parallel:
            calls["maxItems"] = 1
        return ToolPlan(calls, None)
    name = tool_choice.function.name
    if name not in by_name:
        raise InvalidInput(f"tool_choice names the function `{name}`, which is not in tools", param="tool_choice")
    return ToolPlan(by_name[name].parameters, name)


def calls_of(tool_plan: ToolPlan, result: GenerationResult) -> list[ToolCall] | None:
    """The calls a generation made; None when its JSON is not whole (cut short: its text is the reply)."""
    if not result.structured_complete:
        return None
    if tool_plan.function is not None:
        named = [(tool_plan.function, result.text)]  # the arguments as the model wrote them
    else:
        named = [(call["name"], json.dumps(call["parameters"])) for call in json.loads(result.text)]
    return [
        ToolCall(id=f"call_{os.urandom(12).hex()}", function=FunctionCall(name=name, arguments=arguments))
        for name, arguments in named
    ]


def template_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """The request's tools as transformers' chat templates take them (OpenAI's shape); None for none."""
    return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The request's messages as transformers' chat templates take them: assistant tool calls with
    their arguments as objects, tool results with the id of the call they answer."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                }
                for call in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # a client's own text: the template gets it as it is
        return text
