"""Turn a growing list of token ids into text deltas: valid UTF-8, correct spacing.

Each delta is the difference between decoding a short window of recent tokens with and without the
newest ones, so byte-level tokens that split a character wait until it is complete (no U+FFFD) and
SentencePiece's leading spaces come out right. The window starts in the prompt's last tokens, so the
first generated token keeps its space. Stop strings are left to kiln.engine.stopping.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.model.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens  # leave special tokens out of the text
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this have been turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character is emitted as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
