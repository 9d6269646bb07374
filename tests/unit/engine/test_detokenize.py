"""Incremental detokenization: valid UTF-8 in every delta, deltas add up to the full decode."""

from __future__ import annotations

import pytest

from kiln.engine.detokenize import IncrementalDetokenizer
from kiln.model.load import LoadedModel

TEXTS = [
    "Plain English, with punctuation: yes! (And numbers 3.14.)",
    "Emoji split across byte tokens: 🦙🔥 and flags 🇫🇷.",
    "Accents and scripts: café, naïve, Zürich, 東京, Москва, العربية.",
    "  leading spaces\nand\ttabs   inside  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_valid_and_add_up(default_model: LoadedModel, text: str) -> None:
    tok = default_model.tokenizer
    prompt = tok.encode("Say something:")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_incomplete_character_is_flushed_at_the_end(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    ids = tok.encode("🦙")
    assert len(ids) > 1, "the emoji should span several byte tokens"
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push(ids[0]) == ""
    assert detok.flush() == tok.decode(ids[:1])


@pytest.mark.parametrize("skip", [True, False])
def test_direct_decode_matches_transformers(default_model: LoadedModel, skip: bool) -> None:
    # Tokenizer.decode goes to the Rust tokenizer directly; transformers' decode is the reference
    tok = default_model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": " ".join(TEXTS)}])
    for start in range(0, len(ids) - 6):
        window = ids[start : start + 6]
        want = tok.hf.decode(window, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert tok.decode(window, skip) == want, window
