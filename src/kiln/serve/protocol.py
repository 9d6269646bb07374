"""The OpenAI-compatible wire format: request schemas (validated with pydantic) and the error envelope.

Only the HTTP edge uses pydantic; everything behind it takes kiln's own SamplingParams. Fields kiln
does not support are refused by name rather than ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from kiln.engine.sampler import MAX_SEED, MIN_SEED, SamplingParams

MAX_STOP = 4  # as OpenAI: up to four stop sequences


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
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: a named schema the output must match."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object; {}: any value
    strict: bool | None = None  # kiln always holds the output to the schema


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


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8, strict=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED, strict=True)  # see sampler.torch_seed
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past the end-of-sequence token
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _json_ends(self) -> _Sampling:
        # once the JSON is complete the grammar allows nothing but the end of the sequence
        if self.ignore_eos and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("ignore_eos cannot be used with a JSON response_format, which ends at the end of "
                             "the JSON; drop one of them")
        return self

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
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=0, min_p=0.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=seed,
            stop=tuple(self.stop or ()), logprobs=logprobs, ignore_eos=self.ignore_eos, grammar=grammar,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    suffix: None = None  # not supported: refused if set to anything

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str  # or OpenAI's list of content parts, of which text parts are taken (joined as below)
    name: str | None = None

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


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=200)
    rating: float
    comment: str | None = Field(default=None, max_length=10_000)
