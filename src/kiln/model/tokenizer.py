"""The model's fast tokenizer and chat template, through transformers (the reference implementation).

Streaming text out of token ids is left to kiln.engine.detokenize.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.errors import InvalidParameterError, ModelFormatError
from kiln.model.hermes import hermes_messages
from kiln.model.spec import ModelSpec

# {"role": "system" | "user" | "assistant" | "tool", "content": ...}, and OpenAI's "tool_calls" (their arguments
# parsed to objects, as templates expect) on an assistant turn
Message = Mapping[str, Any]


def _config_validation_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's error for a config that fails transformers' checks (not a ValueError; recent hubs only)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


class Tokenizer:
    """Encode, decode and apply the chat template of one model."""

    def __init__(self, folder: Path, spec: ModelSpec) -> None:
        from transformers import AutoTokenizer

        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise ModelFormatError(
                f"folder {folder} has no tokenizer.json; copy the model's tokenizer files next to its weights"
            )
        unreadable: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError,
                                                   *_config_validation_errors())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.hf = AutoTokenizer.from_pretrained(folder)
            except unreadable as exc:
                # transformers also reads and validates config.json here (e.g. heads that do not divide the width)
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise ModelFormatError(f"folder {folder}: transformers cannot load its tokenizer ({reason}); fix "
                                       "config.json and the tokenizer files, or re-export the model") from exc
        eos = set(spec.eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = len(self.hf)
        # the Rust tokenizer behind a fast one decodes directly: the same text (checked on WikiText and
        # chat turns) without transformers' per-call argument handling, which the engine pays per token
        self._fast_decode = getattr(self.hf, "backend_tokenizer", None) if getattr(self.hf, "is_fast", False) else None

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context: BOS, or EOS when the model has none."""
        bos = self.hf.bos_token_id
        return int(bos if bos is not None else self.hf.eos_token_id)

    @property
    def adds_bos(self) -> bool:
        """Whether encoding with special tokens puts BOS first (llama.cpp's add_bos)."""
        bos = self.hf.bos_token_id
        return bos is not None and self.encode("a")[:1] == [bos]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders tools itself (Qwen 2.5, Hermes 2 Pro, Llama 3.1 name `tools` in their
        Jinja source; SmolLM2's does not). A dict of named templates counts if any of them does."""
        return self.has_chat_template and "tools" in str(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens (BOS) are added as the model's tokenizer is configured."""
        try:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        except TypeError:  # bytes that are not UTF-8 (stdin, argv) arrive as lone surrogates, which the Rust
            try:  # tokenizer refuses with a TypeError; checked only then, so sound text is not encoded twice
                text.encode("utf-8")
            except UnicodeEncodeError:  # no position: through the chat template it would count the template's text
                raise InvalidParameterError("the text holds bytes that are not valid UTF-8; pass UTF-8 text") from None
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of spaces before punctuation: streamed deltas must concatenate to this text.
        if self._fast_decode is not None:
            return str(self._fast_decode.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return str(
            self.hf.decode(
                list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
            )
        )

    def render_chat(self, messages: Sequence[Message], fix: str = "send the prompt as plain text",
                    tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, ending with the assistant's turn opening (unless
        add_generation_prompt is False: then with the last message).

        `tools` (OpenAI's function tools) go to a template that renders them; for one that does not, they, the
        assistant's calls and the tools' results are written in the Hermes format (model/hermes.py) into plain
        turns. `fix` ends the error for a model without a template: what the caller's user can do instead.
        """
        from jinja2 import TemplateError, TemplateSyntaxError

        if not self.has_chat_template:
            raise ModelFormatError(f"this model has no chat template; {fix}")
        try:
            if self.template_takes_tools:
                return str(self.hf.apply_chat_template([dict(m) for m in messages],
                                                       tools=[dict(t) for t in tools] if tools else None,
                                                       tokenize=False, add_generation_prompt=add_generation_prompt))
            return str(self.hf.apply_chat_template(hermes_messages(messages, tools), tokenize=False,
                                                   add_generation_prompt=add_generation_prompt))
        except TemplateSyntaxError as exc:
            raise ModelFormatError(f"the model's chat template cannot be read (line {exc.lineno}: {exc.message}); "
                                   f"fix chat_template in its tokenizer_config.json, or {fix}") from exc
        except TemplateError as exc:
            if type(exc) is not TemplateError:  # not raise_exception(): the template fails (an undefined function
                # or attribute, as a function this transformers lacks), which no change of the messages is asked for
                raise ModelFormatError(f"the model's chat template failed on these messages ({exc.message}); fix "
                                       f"chat_template in its tokenizer_config.json, or {fix}") from exc
            # raise_exception() in the template: e.g. roles that must alternate
            raise InvalidParameterError(f"the model's chat template refused these messages: {exc.message}; change "
                                        "the messages as it asks") from exc
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:  # Python's own, from the template's
            # expressions (a string added to a number, a missing key): the same failure as an undefined attribute
            raise ModelFormatError(f"the model's chat template failed on these messages ({type(exc).__name__}: "
                                   f"{exc}); fix chat_template in its tokenizer_config.json, or {fix}") from exc

    def encode_chat(self, messages: Sequence[Message], fix: str = "send the prompt as plain text",
                    tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
        # The template text carries its own special tokens (BOS included where the model wants one).
        return self.encode(self.render_chat(messages, fix, tools, add_generation_prompt), add_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return str(self.hf.convert_ids_to_tokens(token_id))
