"""Request and response models of the HTTP APIs (the OpenAPI document is generated from them)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator


def _json_integer(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a valid integer")
    return value


# A JSON Schema integer: an int, or a number with no fractional part (5.0); never true, false or "5".
# `Annotated[int, _LAX, Field(<bounds>), _INTEGER]`: the bounds before the validator, or the OpenAPI
# document loses them (pydantic cannot see through a validator).
_LAX = Strict(False)
_INTEGER = BeforeValidator(_json_integer)
PositiveInt = Annotated[int, _LAX, Field(ge=1), _INTEGER]
TokenId = Annotated[int, _LAX, Field(ge=0), _INTEGER]


class _Strict(BaseModel):
    """What a request may send: JSON types as the document says them (pydantic's lax mode would take
    `true` for an integer, `1` for a boolean and `"5"` for a number); integers are `_INTEGER`s.
    Subclasses' own config adds to this."""

    model_config = ConfigDict(strict=True)


_SURROGATE = re.compile("[\ud800-\udfff]")


class NotText(ValueError):
    r"""A string of a request that is not text: a lone surrogate (JSON lets `\ud800` be written; no
    tokenizer, and no UTF-8, can carry it). `path` names where, as `messages.1.content`."""

    def __init__(self, path: str, text: str, at: int):
        self.path = path
        super().__init__(
            f"{path}: a lone surrogate (U+{ord(text[at]):04X}) at character {at} is not text; send text as UTF-8 "
            "(a character beyond U+FFFF as a surrogate pair)"
        )


def check_text(value: Any, path: str = "") -> None:
    """NotText for the first string of a JSON document (keys included) that holds a lone surrogate.
    orjson refuses such a string, in C: only then is the document walked (in Python) to say where."""
    try:
        orjson.dumps(value)
        return
    except orjson.JSONEncodeError:  # a surrogate, or something else orjson refuses (an integer past 64 bits)
        pass
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                raise NotText(where or "body", item, found.start())
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                inner = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and (found := _SURROGATE.search(key)) is not None:
                    raise NotText(inner, key, found.start())
                stack.append((child, inner))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}" if where else str(i)) for i, child in reversed(list(enumerate(item))))


class _Body(_Strict):
    """A request's body: every string in it is text (422 naming the field otherwise)."""

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        check_text(data)
        return data


_DEFAULT = "Left out: the model's generation_config.json value if it sets one, else 1.0."
Temperature = Annotated[float | None, Field(ge=0.0, le=2.0, description=f"0 = greedy. {_DEFAULT}")]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0, description=_DEFAULT)]
_Stop = Annotated[str, Field(min_length=1, max_length=64)]
# Constraints live in the schema (not in validators), so the OpenAPI document tells the whole truth.
StopStrings = Annotated[
    _Stop | Annotated[list[_Stop], Field(max_length=4)] | None,
    Field(description="Up to 4 strings; generation stops before the first of them."),
]
Seed = Annotated[
    Annotated[int, _LAX, Field(ge=0, le=2**63 - 1), _INTEGER] | None,
    Field(description="The same seed and settings give the same sampled tokens. Left out: random."),
]
TopK = Annotated[
    Annotated[int, _LAX, Field(ge=-1, le=1_000_000), _INTEGER] | None,
    Field(
        description="Sample among the k most likely tokens; 0 or -1: among all. Left out: the model's "
        "generation_config.json value if it sets one, else 0.",
    ),
]
PresencePenalty = Annotated[
    float, Field(ge=-2.0, le=2.0, description="Subtracted from the logit of every token the output already holds.")
]
FrequencyPenalty = Annotated[
    float, Field(ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time the output holds it.")
]

RepetitionPenalty = Annotated[
    float,
    Field(
        gt=0.0,
        le=2.0,
        description="vLLM's and transformers': the logit of each token the prompt or the output holds is divided "
        "by it when positive, multiplied when negative. 1.0 = off; above 1 discourages repeats.",
    ),
]
MinP = Annotated[
    float,
    Field(ge=0.0, le=1.0, description="Sample only among tokens at least min_p times as likely as the most likely."),
]
MinTokens = Annotated[
    int,
    _LAX,
    Field(
        ge=0,
        le=1_000_000,
        description="vLLM's: the end-of-text token is not chosen before this many tokens (stop strings still stop).",
    ),
    _INTEGER,
]
IgnoreEos = Annotated[
    bool,
    Field(
        description="vLLM's, for load tests of a fixed output length: the end-of-text token does not end the "
        "generation (max_tokens, a stop string or a complete structured output does)."
    ),
]
LogitBias = Annotated[
    Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
        # The schema's patternProperties alone would allow any other key: say that none is.
        Field(json_schema_extra={"additionalProperties": False}),
    ]
    | None,
    Field(
        max_length=1024,
        description="OpenAI's: token id (a string of digits) → bias from -100 to 100, added to the token's logit "
        "before the choice (-100 bans it, 100 all but forces it). Up to 1,024 ids, each below the model's vocabulary "
        "size.",
    ),
]


class TextFormat(_Strict):
    type: Literal["text"] = Field(description="Free text (the default).")


class JsonObjectFormat(_Strict):
    type: Literal["json_object"] = Field(description="Any JSON object.")


class JsonSchema(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The schema's name (not used to generate).")
    description: str | None = Field(None, max_length=4096, description="Not used to generate.")
    definition: dict[str, Any] = Field(
        alias="schema",
        description="The JSON Schema the output must follow. A schema that cannot be compiled gets a 400 that "
        "says why.",
    )
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced, strict or not.")


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"] = Field(description="JSON that follows `json_schema.schema`.")
    json_schema: JsonSchema = Field(description="The schema, as OpenAI's API takes it.")


ResponseFormat = Annotated[
    Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")] | None,
    Field(
        description="OpenAI's structured output: `json_schema` holds the output to a JSON Schema, `json_object` to "
        "any JSON object; tokens that would break it are never chosen, and the generation stops as soon as the JSON "
        "is complete. A generation cut short (max_tokens, a stop string) returns incomplete JSON, as OpenAI's does."
    ),
]


class _OneConstraint(_Strict):
    model_config = ConfigDict(extra="forbid")  # exactly one kind of constraint per request


class JsonConstraint(_OneConstraint):
    json_schema: dict[str, Any] = Field(alias="json", description="A JSON Schema the output follows.")


class RegexConstraint(_OneConstraint):
    regex: str = Field(min_length=1, max_length=10_000, description="A regular expression the whole output matches.")


class ChoiceConstraint(_OneConstraint):
    choice: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        min_length=1, max_length=1000, description="The output is exactly one of these strings."
    )


class GrammarConstraint(_OneConstraint):
    grammar: str = Field(
        min_length=1,
        max_length=100_000,
        description="A context-free grammar in llguidance's Lark syntax (https://github.com/guidance-ai/llguidance/"
        'blob/main/docs/syntax.md), e.g. `start: "yes" | "no"`.',
    )


StructuredOutputs = Annotated[
    JsonConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint | None,
    Field(
        description="vLLM's structured outputs, one of `json`, `regex`, `choice` or `grammar`: the output is held to "
        "it as with response_format (which it may not be given with)."
    ),
]


def stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


# --- POST /generate (the seed's endpoint) ------------------------------------------------------------------
class GenerateRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Text to continue.")
    max_tokens: PositiveInt | None = Field(
        None,
        validation_alias=AliasChoices("max_tokens", "max_new_tokens"),
        description="Tokens to generate at most.",
    )
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    stop: StopStrings = None
    seed: Seed = None
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_p: MinP = 0.0
    logit_bias: LogitBias = None
    response_format: ResponseFormat = None
    structured_outputs: StructuredOutputs = None
    min_tokens: MinTokens = 0
    ignore_eos: IgnoreEos = False
    model: str | None = Field(None, description="The served model's name; another name gets 404.")
    return_token_ids: bool = Field(False, description="Include the generated token ids in the response.")
    stream: bool = Field(
        False,
        description='Server-sent events: `{"text": delta}` per piece of text, then one event with the '
        "whole response (as without streaming, `text` included), then `[DONE]`.",
    )


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_prompt_tokens: int = Field(
        description="Of the prompt tokens, those whose KV cache came from the prefix cache (not fed to the model)."
    )
    output_tokens: int
    perplexity: float | None = Field(description="exp(mean negative log-likelihood) of the generated tokens.")
    time_to_first_token_seconds: float | None = None
    token_ids: list[int] | None = None


# --- OpenAI: shared --------------------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="A last event with the token counts (`usage`) and no choices.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Prompt tokens whose KV cache came from the prefix cache: not fed through the model."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _OpenAIRequest(_Body):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extensions).
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="The served model's name (`GET /v1/models`); another name gets 404.")
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    n: Annotated[int, _LAX, Field(ge=1, le=128), _INTEGER] = Field(
        1, description="Choices to generate, each its own generation; at most max_concurrent_requests."
    )
    stream: bool = Field(False, description="Server-sent events, one per piece of text, then `[DONE]`.")
    stream_options: StreamOptions | None = None
    stop: StopStrings = None
    seed: Seed = None
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_p: MinP = 0.0
    logit_bias: LogitBias = None
    response_format: ResponseFormat = None
    structured_outputs: StructuredOutputs = None
    min_tokens: MinTokens = 0
    ignore_eos: IgnoreEos = False
    user: str | None = Field(None, max_length=256, description="Never logged nor used as a label.")


# --- POST /v1/completions ---------------------------------------------------------------------------------------
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_OpenAIRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(
        description="A string, or token ids (each below the model's vocabulary size); or a list of exactly one "
        "of either."
    )
    max_tokens: PositiveInt | None = Field(16, description="Tokens to generate at most (OpenAI's default, 16).")
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs, the prompt's too).")
    logprobs: Annotated[int, _LAX, Field(ge=0, le=5), _INTEGER] | None = Field(
        None, description="Log-probability of each token and of the N most likely at each position."
    )
    suffix: None = Field(None, description="Not supported.")

    @property
    def prompt_text(self) -> str | None:
        """The prompt when it is text; None when it is token ids."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return prompt if isinstance(prompt, str) else None

    @property
    def prompt_token_ids(self) -> list[int] | None:
        """The prompt when it is token ids; None when it is text."""
        prompt = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], list) else self.prompt
        return prompt if isinstance(prompt, list) and isinstance(prompt[0], int) else None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for a prompt's first token (no context).")
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- POST /v1/chat/completions ----------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(max_length=64, description="The function called.")
    arguments: str = Field(max_length=1_000_000, description="Its arguments, as JSON text.")


class ToolCall(_Strict):
    id: str = Field(max_length=256, description="The call's id, which the tool message answering it repeats.")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        description="Text, or text parts (joined); null for an assistant message that only calls tools."
    )
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=128, description="An assistant message's tool calls (as a response gave them)."
    )
    tool_call_id: str | None = Field(None, max_length=256, description="A tool message's: the call it answers.")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The function's name.")
    description: str | None = Field(None, max_length=8192, description="What it does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of its arguments; the arguments of a call always follow it. Left out: none.",
    )
    strict: bool | None = Field(None, description="Accepted; the arguments always follow `parameters`.")


class ChatTool(_Strict):
    type: Literal["function"] = Field(description="The one kind of tool: a function.")
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(None, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: PositiveInt | None = Field(
        None,
        description="Tokens to generate at most. Left out (and max_tokens too): SLM_DEFAULT_MAX_TOKENS, within the "
        "context.",
    )
    logprobs: bool = Field(False, description="Log-probability of each generated token.")
    top_logprobs: Annotated[int, _LAX, Field(ge=0, le=20), _INTEGER] | None = Field(
        None, description="With logprobs: the N most likely tokens at each position."
    )
    tools: list[ChatTool] | None = Field(
        None, max_length=128, description="Functions the model may call; shown to it by its chat template."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='`"required"`: one call or more, each following its tool\'s parameters; a named function: a call '
        'of it; `"none"`: text, tools not shown. `"auto"`, the default when tools are given, is refused (400): it '
        "needs a parser of the model's own tool-call format.",
    )
    parallel_tool_calls: bool = Field(True, description='With "required": false allows one call only.')

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The text; null when the reply is tool calls.")
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --- GET /v1/models ----------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slm-monitoring"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- POST /tokenize, POST /detokenize (vLLM's) --------------------------------------------------------------------
class TokenizeText(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name; another name gets 404.")
    prompt: str = Field(description="Text, tokenized as /v1/completions and /generate tokenize a prompt.")


class TokenizeChat(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name; another name gets 404.")
    messages: list[ChatMessage] = Field(
        min_length=1, description="Tokenized as /v1/chat/completions does: the chat template, the assistant's turn."
    )
    tools: list[ChatTool] | None = Field(
        None,
        max_length=128,
        description="Shown by the chat template, as a chat whose tool_choice calls them shows them.",
    )


class TokenizeResponse(BaseModel):
    count: int = Field(description="Prompt tokens, as the usage of a generation from it would count them.")
    max_model_len: int = Field(description="The model's context: prompt plus generated tokens.")
    tokens: list[int]


class DetokenizeRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name; another name gets 404.")
    tokens: list[TokenId] = Field(description="Token ids, each below the model's vocabulary size.")


class DetokenizeResponse(BaseModel):
    prompt: str


# --- errors ------------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Prompt longer than the context, or max_tokens over the cap"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    408: {"model": ErrorResponse, "description": "Request body not received within request_timeout_seconds"},
    413: {"model": ErrorResponse, "description": "Request body over max_body_bytes"},
    422: {
        "model": ErrorResponse,
        "description": "Schema error, or a string that is not text; the message names the field",
    },
    429: {
        "model": ErrorResponse,
        "description": "Generations or preparations running and queued at their limits; see Retry-After",
    },
    500: {"model": ErrorResponse, "description": "The model failed"},
    503: {"model": ErrorResponse, "description": "Model not loaded yet; see Retry-After"},
    504: {"model": ErrorResponse, "description": "request_timeout_seconds passed"},
}
