"""The OpenAI-compatible wire format: request schemas (validated with pydantic) and the error envelope.

Only the HTTP edge uses pydantic; everything behind it takes kiln's own SamplingParams. Fields kiln
does not support are refused by name rather than ignored.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kiln.engine.sampler import MAX_LOGIT_BIAS, MAX_SEED, MIN_SEED, SamplingParams

MAX_STOP = 4  # as OpenAI: up to four stop sequences
# OpenAI takes at most 300 logit_bias entries (dottxt-ai/outlines#99 ran into it); the bound keeps a request's
# per-step cost small whatever the body limit lets through
MAX_LOGIT_BIAS_ENTRIES = 300
TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]{0,17}")  # a token id as a JSON object key: one spelling per id
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a function's name


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_code(error: Exception) -> str:
    """The code of a refusal that has none of its own: its error class's name in snake_case (InvalidParameterError:
    "invalid_parameter_error", ContextLengthError: "context_length_error", KilnError: "kiln_error"), the same
    streamed or not. Refusals the routes check themselves keep OpenAI's codes (context_length_exceeded, ...)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(default=False, strict=True)


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: a named schema the output must match."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object; {}: any value
    strict: bool | None = Field(default=None, strict=True)  # kiln always holds the output to the schema


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object ({\"name\": ..., \"schema\": {...}})")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema goes with type json_schema, not {self.type!r}; drop one of them")
        return self

    def schema_or_none(self) -> dict[str, Any] | None:
        """The schema the output must match (json_object: any JSON object), or None for plain text."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema else None
        return {"type": "object"} if schema is None else schema


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(body: Any) -> tuple[str, str, str] | None:
    """The first string or object key in a request body that holds a lone surrogate: where (as a param is written:
    "messages.0.content"; "" for the body itself), what ("the text" or "a key") and the surrogate. JSON may escape one
    (\\ud800), but it is no character: UTF-8 cannot encode it, so the tokenizer, the request log and every other
    place that writes the text out fail on it. The walk keeps its own stack: a body may nest deeper than Python
    recurses."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                return path, "the text", found.group()
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                found = _SURROGATE.search(key)
                if found:
                    return path, "a key", found.group()
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in reversed(list(enumerate(value))))
    return None


class _RequestBody(BaseModel):
    """A request's whole body: its text is Unicode, which JSON's escapes can break."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        found = _lone_surrogate(data)
        if found is not None:  # named by its place in ctx: a check of the whole body has no field of its own
            param, what, surrogate = found
            raise PydanticCustomError(
                "lone_surrogate", "{what} holds a lone surrogate ({escape}), which is not a character; send valid "
                "Unicode text (a character beyond U+FFFF escaped as a surrogate pair)",
                {"param": param or None, "what": what, "escape": f"\\u{ord(surrogate):04x}"})
        return data


class _Sampling(_RequestBody):
    """Fields shared by completions and chat completions."""

    # NaN and ±inf (JSON's 1e999, or Python's NaN and Infinity literals, which the JSON reader takes) are refused
    # as not finite: NaN fails every range check, and the range named in that message was not what is wrong
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    # strict=True on every number and boolean, as OpenAI: "2", 2.5 or true for an integer, "0.5" or true for a
    # float, "true", 1 or "yes" for a boolean are a 400 naming the field, not coerced (pydantic's lax mode
    # turned "true" into a stream and "0.5" into a temperature). A float field still takes an integer (1).
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    n: int = Field(default=1, ge=1, le=8, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED, strict=True)  # see sampler.torch_seed
    user: str | None = None
    # vLLM's extension: keep generating past the end-of-sequence token
    ignore_eos: bool = Field(default=False, strict=True)
    response_format: ResponseFormat | None = None
    # token id (a string, as JSON keys are) -> a bias in [-100, 100] added to its logit before sampling; logprobs
    # stay the model's own, as vLLM reports them by default. Ids are checked against the model's vocabulary
    # once the model is known (routes._check_token_ids)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions (llama-server takes the same names); the defaults leave them off
    top_k: int = Field(default=0, ge=-1, strict=True)  # the k most likely tokens; -1 or 0: off, as vLLM
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, strict=True)  # drop tokens below min_p x the top probability
    # divide positive (multiply negative) logits of the prompt's and output's tokens; 1: off. SamplingParams' range
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, strict=True)
    min_tokens: int = Field(default=0, ge=0, strict=True)  # tokens before EOS, a stop token or string may end it
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # end the output as EOS does
    skip_special_tokens: bool = Field(default=True, strict=True)  # leave special tokens out of the text

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        """Every key a token id written as a decimal integer, every bias a number in [-100, 100], at most
        MAX_LOGIT_BIAS_ENTRIES of them; one message naming the bad key rather than pydantic's per-entry errors."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError('logit_bias must be an object of token ids and biases, e.g. {"50256": -100}')
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
        for key, bias in value.items():
            if not isinstance(key, str) or not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias key {key!r} is not a token id; write ids as decimal integers, "
                                 'e.g. {"50256": -100}')
            # NaN fails the comparison too
            if not isinstance(bias, int | float) or isinstance(bias, bool) \
                    or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{key!r}] is {bias!r}; a bias must be a number in "
                                 f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        return value

    @model_validator(mode="after")
    def _json_ends(self) -> _Sampling:
        # once the JSON is complete the grammar allows nothing but the end of the sequence
        if self.response_format is not None and self.response_format.type != "text":
            for name in ("ignore_eos", "min_tokens"):
                if getattr(self, name):
                    raise ValueError(f"{name} cannot be used with a JSON response_format, which ends at the end of "
                                     "the JSON; drop one of them")
        return self

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys as token ids."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def token_limit(self) -> tuple[int | None, str]:
        """The tokens to generate at most that the client sent (None: none), and the field that it sent them in, for
        the messages that name it."""
        return self.max_tokens, "max_tokens"

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # refused rather than ignored, as OpenAI and vLLM do: options for a stream that is not asked for are a mistake
        # (stream is declared first, so it is in info.data unless it failed its own check)
        if value is not None and info.data.get("stream") is False:
            raise ValueError("stream_options is only allowed when stream is true; drop stream_options or set stream")
        return value

    def sampling(self, max_tokens: int, logprobs: int | None, seed_offset: int = 0,
                 grammar: str | None = None) -> SamplingParams:
        seed = None if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=seed, stop=tuple(self.stop or ()), logprobs=logprobs,
            ignore_eos=self.ignore_eos, grammar=grammar, logit_bias=tuple(self.token_biases().items()),
            min_tokens=self.min_tokens, stop_token_ids=frozenset(self.stop_token_ids or ()),
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(...)
    echo: bool = Field(default=False, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    suffix: Any = None  # not supported: refused if set to anything

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> None:
        if value is not None:  # pydantic's own words for a None-only field were "Input should be None"
            raise ValueError("suffix (text after the completion, for fill-in-the-middle) is not supported; drop it")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One message for any prompt of the wrong shape, rather than one per member of the union above; token ids
        are integers, never floats, strings or booleans, as every integer field here."""

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(p, str) for p in value) or is_ids(value) or all(is_ids(p) for p in value))):
            return value
        raise ValueError("the prompt must be a string, a list of strings, a list of token ids (integers) or a list "
                         "of such lists")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        prompts: list[Any] = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("the prompt is empty")
        if len(prompts) > 64:
            raise ValueError(f"at most 64 prompts per request, got {len(prompts)}")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: a string, a token list, or a list of either (one choice set each)."""
        value = self.prompt
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]  # type: ignore[list-item]
        return list(value)  # type: ignore[arg-type]


class FunctionDefinition(BaseModel):
    """A tool's function: its name, what it does, and the JSON schema of its arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # None: the function takes any object (OpenAI: no arguments)
    strict: bool | None = Field(default=None, strict=True)  # forced calls always follow the schema

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME.fullmatch(value):
            raise ValueError(f"the function name {value!r} must be 1 to 64 letters, digits, '_' or '-'; rename it")
        return value

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # the arguments come back as a JSON object (OpenAI's rule too), so a schema of anything else cannot be met
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f"the parameters schema has type {value['type']!r}; the arguments are a JSON object, "
                             "so give it type 'object'")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation, sent back in its message."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template_form(self) -> dict[str, Any]:
        """The call as chat templates take it: its arguments parsed to an object (Jinja templates write them
        with tojson), or left as text when they are not JSON."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: a call to that tool."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None  # or OpenAI's list of content parts, of which text parts are taken (joined as below)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (its content may then be null)
    tool_call_id: str | None = None  # a tool message: the call whose result it is

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Join a list of text parts into one string with newlines between them, as vLLM does; any other part
        (image_url, input_audio, file, ...) is refused by type, since kiln's models take text only."""
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("the list of content parts is empty; send a string or at least one text part")
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} is not an object; send {{\"type\": \"text\", \"text\": \"...\"}}")
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}; this model takes text only, so send parts "
                                 "of type 'text' or a string")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part {i} must be {{\"type\": \"text\", \"text\": \"...\"}} and nothing more")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are the assistant's; a {self.role} message cannot carry them")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id goes with role 'tool', not {self.role!r}; drop it")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            article = "an" if self.role == "assistant" else "a"  # the only role that starts with a vowel sound
            raise ValueError(f"{article} {self.role} message needs content (only an assistant message with "
                             "tool_calls may leave it null)")
        return self

    def template_form(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.template_form() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _results_answer_calls(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    """Refuse a tool result whose tool_call_id names no call an earlier assistant message made, as OpenAI does:
    the template writes it as the answer to a call the model never made, and a typo in the id went unnoticed."""
    made: set[str] = set()
    for i, message in enumerate(messages or ()):
        made.update(call.id for call in message.tool_calls or ())
        if message.role == "tool" and message.tool_call_id not in made:
            raise ValueError(f"message {i} is the result of tool call {message.tool_call_id!r}, which no earlier "
                             "assistant message makes; send the assistant message with that call before it, or fix "
                             "the id")
    return messages


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    _calls_answered = field_validator("messages")(_results_answer_calls)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    tools: list[Tool] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # OpenAI and vLLM refuse it; it was ignored, and the answer came back without logprobs
        if value is not None and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs applies with logprobs: true; set logprobs or drop top_logprobs")
        return value
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = Field(default=True, strict=True)  # required may give several calls

    def token_limit(self) -> tuple[int | None, str]:
        # OpenAI's newer name wins when both are sent
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in value or ()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"the tool names {repeated} are given more than once; give each tool its own name")
        return value or None  # [] is no tools, as vLLM and llama.cpp take it

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_shape(cls, value: Any) -> Any:
        """One message for any tool_choice of the wrong shape, rather than one per member of the union."""
        if value is None or value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) else None
        if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "function"} \
                and isinstance(function, dict) and set(function) == {"name"} and isinstance(function["name"], str):
            return value
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                         "{\"name\": ...}}")

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        # tools, response_format, ignore_eos and min_tokens are declared first: in info.data unless they failed their
        # own check
        if value is None or value == "none" or "tools" not in info.data:
            return value
        tools = info.data["tools"]
        named = value.function.name if isinstance(value, NamedToolChoice) else None
        shown = f"{{'function': {{'name': {named!r}}}}}" if named is not None else repr(value)
        if not tools:  # refused as OpenAI does: a choice among no tools is a mistake
            raise ValueError(f"tool_choice {shown} needs tools; send tools or drop tool_choice")
        if named is not None and named not in [t.function.name for t in tools]:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools "
                             f"({', '.join(t.function.name for t in tools)}); name one of them")
        if value == "auto":
            return value
        response_format = info.data.get("response_format")
        if response_format is not None and response_format.type != "text":
            raise ValueError(f"tool_choice {shown} and a JSON response_format both hold the output to a grammar; "
                             "pick one")
        for name in ("ignore_eos", "min_tokens"):
            if info.data.get(name):
                raise ValueError(f"{name} cannot be used with tool_choice {shown}, whose calls end the output; drop "
                                 "one of them")
        return value

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.template_form() for m in self.messages]

    def tool_mode(self) -> Literal["none", "auto", "forced"]:
        """What the tools do: nothing (tool_choice none, or no tools), offered (auto, the default with tools: the
        model may call one), or forced (required, or a named tool: the output is held to calls, forced_tools())."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        return "auto" if self.tool_choice in (None, "auto") else "forced"

    def forced_tools(self) -> list[Tool]:
        """The tools a forcing tool_choice chooses among: all for required, the named one, none otherwise."""
        if self.tool_mode() != "forced":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or () if t.function.name == self.tool_choice.function.name]
        return list(self.tools or ())

    def allows_several_calls(self) -> bool:
        """Whether a forced answer may hold more than one call: with required and parallel_tool_calls. A named
        tool gets exactly one, as vLLM's named tool_choice does: held to calls with no end but max_tokens, the
        default model called the same tool again and again until it ran out."""
        return self.parallel_tool_calls and not isinstance(self.tool_choice, NamedToolChoice)


class TokenizeRequest(_RequestBody):
    """vLLM's /tokenize: a prompt as /v1/completions encodes it, or messages (and tools) as /v1/chat/completions
    renders them with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    # validate_default: the check that exactly one of prompt and messages is given runs when neither is
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, validate_default=True)
    tools: list[Tool] | None = None
    add_generation_prompt: bool | None = Field(default=None, strict=True)  # messages only; None: true, as chat

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, value: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if "prompt" not in info.data:  # the prompt failed its own check
            return value
        if (value is None) == (info.data["prompt"] is None):
            raise ValueError("send either a prompt (text) or messages (a chat), not both" if value is not None else
                             "send a prompt (text) or messages (a chat) to tokenize")
        return _results_answer_calls(value)

    @field_validator("tools", "add_generation_prompt")
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        # refused rather than ignored: a prompt is not rendered with the template
        if value is not None and "messages" in info.data and info.data["messages"] is None:
            raise ValueError(f"{info.field_name} goes with messages; a prompt is tokenized as it is")
        return value

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.template_form() for m in self.messages or ()]


class DetokenizeRequest(_RequestBody):
    """vLLM's /detokenize: token ids back to text, special tokens included (the inverse of /tokenize)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]


class FeedbackRequest(_RequestBody):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN rating: "not a finite number", as _Sampling
    id: str = Field(..., min_length=1, max_length=200)
    rating: float = Field(..., strict=True)  # true was stored as 1.0 and "5" as 5.0; feedback.py checks the range
    comment: str | None = Field(default=None, max_length=10_000)
