"""Optional per-model input and output filters: regex patterns, whole-word blocklists and a PII check.

Rules come from a small TOML file validated at load, so a bad regex fails at startup, not on a request.
This module only says whether text violates the rules (and, for a streamed response, how much of it may be
sent yet); refusing the request (and how) is the server's job.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.errors import KilnError
from kiln.serve import redact

_RULE_KEYS = ("patterns", "blocklist", "pii")
_SECTIONS = ("input", "output")


class GuardrailConfigError(KilnError):
    """The guardrails file is missing, is not valid TOML, or holds an unknown key, wrong type or bad regex."""


@dataclass(frozen=True)
class FilterRules:
    """What one direction (input or output) refuses; the default refuses nothing."""

    patterns: tuple[str, ...] = ()
    """Regexes searched case-insensitively anywhere in the text."""
    blocklist: tuple[str, ...] = ()
    """Phrases matched as whole words, case-insensitively; inner spaces match any run of whitespace."""
    pii: bool = False
    """Refuse text in which redact.find_pii finds an e-mail address, phone number or card number."""
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _phrases: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for pattern in self.patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise GuardrailConfigError(
                    f"guardrail pattern {pattern!r} is not a valid regex ({exc}); fix or remove it"
                ) from None
        phrases = []
        for phrase in self.blocklist:
            words = phrase.split()
            if not words:
                raise GuardrailConfigError("guardrail blocklist holds an empty phrase; remove it")
            # (?<!\w) / (?!\w) rather than \b so phrases that start or end with punctuation still match.
            phrases.append(re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE))
        # Frozen: the compiled forms are derived once here, never assigned later.
        object.__setattr__(self, "_compiled", tuple(compiled))
        object.__setattr__(self, "_phrases", tuple(phrases))

    @property
    def is_active(self) -> bool:
        """Whether any rule is set, so callers can skip checking entirely."""
        return bool(self.patterns or self.blocklist or self.pii)


@dataclass(frozen=True)
class GuardrailConfig:
    """The rules for one model: `input` checks prompts and messages, `output` checks generated text."""

    input: FilterRules = field(default_factory=FilterRules)
    output: FilterRules = field(default_factory=FilterRules)


@dataclass(frozen=True)
class Violation:
    """Why text was refused; `detail` is safe to show the user (a rule, never their text)."""

    kind: Literal["pattern", "blocklist", "pii"]
    detail: str


def _string_tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GuardrailConfigError(f"{where} must be a list of strings, got {value!r}; e.g. [\"first\", \"second\"]")
    return tuple(value)


def rules_from_dict(data: Mapping[str, Any], where: str) -> FilterRules:
    """FilterRules from one TOML table; `where` (file and section) prefixes every error."""
    unknown = sorted(set(data) - set(_RULE_KEYS))
    if unknown:
        raise GuardrailConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(_RULE_KEYS)}")
    pii = data.get("pii", False)
    if not isinstance(pii, bool):
        raise GuardrailConfigError(f"{where}.pii must be true or false, got {pii!r}")
    patterns = _string_tuple(data.get("patterns", []), f"{where}.patterns")
    blocklist = _string_tuple(data.get("blocklist", []), f"{where}.blocklist")
    try:
        return FilterRules(patterns=patterns, blocklist=blocklist, pii=pii)
    except GuardrailConfigError as exc:  # add the file and section to the bad regex or phrase
        raise GuardrailConfigError(f"{where}: {exc}") from None


def load_guardrails(path: Path) -> GuardrailConfig:
    """Read and validate a guardrails TOML file with optional [input] and [output] tables."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GuardrailConfigError(f"guardrails file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardrailConfigError(f"guardrails file {path} cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise GuardrailConfigError(f"guardrails file {path} is not valid TOML ({exc}); fix the syntax") from None
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise GuardrailConfigError(f"{path}: unknown key {unknown[0]!r}; expected [input] and/or [output] tables")
    sections = {}
    for name in _SECTIONS:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise GuardrailConfigError(f"{path}: {name} must be a table ([{name}]), got {table!r}")
        sections[name] = rules_from_dict(table, f"{path} [{name}]")
    return GuardrailConfig(input=sections["input"], output=sections["output"])


def check(rules: FilterRules, text: str, since: int = 0, end: int | None = None) -> Violation | None:
    """The first rule text[:end] breaks (patterns, then blocklist, then PII), or None if it passes.

    `since`: a streamed check's start for phrases and PII (StreamFilter.since says which start finds
    every match the new text can make); patterns are always searched from the start."""
    end = len(text) if end is None else end
    for pattern in rules._compiled:
        if pattern.search(text, 0, end):
            return Violation("pattern", f"matches blocked pattern {pattern.pattern!r}")
    for phrase, compiled in zip(rules.blocklist, rules._phrases, strict=True):
        if compiled.search(text, since, end):  # (a search from `since` still sees the character before it)
            return Violation("blocklist", f"contains blocked phrase {phrase!r}")
    if rules.pii:
        counts = redact.find_pii(text[since:end])
        for kind in redact.KINDS:
            if counts[kind]:
                return Violation("pii", f"contains {redact.DESCRIPTIONS[kind]}")
    return None


# A streamed response is checked up to the end of its last whole word (a phrase at the very end of the text
# so far may yet turn out to be part of a longer word) and sent up to there, less the words a blocked phrase
# could have begun with, and with the PII check on, less this many characters: more than a printed card
# or phone number (or a usual e-mail address) takes, so that none of one goes out before it is recognised.
PII_HOLD_CHARS = 40
# Each piece is checked again from this many characters before the text already checked (far more than an
# e-mail address or a printed phone or card number takes; a longer one is judged on its last part) or from
# the first word a blocked phrase ending in the new text could start with, whichever comes first. Checking
# the whole text every time cost quadratic time on the server's event loop: 1.1 s of CPU over an 8,000-
# character answer fed a word at a time, 16 s over 32,000 (now 0.2 s and 2.6 s, with two patterns, two
# phrases and PII on). Patterns, whose matches may span any length, still read it all.
PII_WINDOW_CHARS = 256
_WORD_CHAR = re.compile(r"\w")
_SPACE = re.compile(r"\s")


class StreamFilter:
    """The output rules applied to one response as it streams: feed() returns the part that may be sent now,
    or the rule the text broke (then nothing more of it may be sent).

    No part of a blocked phrase or of a PII number goes out, and nothing is sent before it has been
    checked. What it cannot promise for patterns: a match is caught before its end is sent, but its start
    may be in text that broke no rule when it went out (as may any match of a pattern that looks ahead).
    """

    def __init__(self, rules: FilterRules) -> None:
        self.rules = rules
        self.text = ""
        self.sent = 0  # characters of `text` sent
        self.checked = 0  # characters of `text` known to break no rule
        self.hold_words = max((len(phrase.split()) for phrase in rules.blocklist), default=1) - 1

    def feed(self, piece: str, final: bool = False) -> tuple[str, Violation | None]:
        self.text += piece
        end = len(self.text) if final else self._back(len(self.text), words=0)
        if end > self.checked:
            violation = check(self.rules, self.text, self.since(), end)
            if violation is not None:
                return "", violation
            self.checked = end
        if not final:
            end = self._back(end, words=self.hold_words)
            if self.rules.pii:
                end = min(end, len(self.text) - PII_HOLD_CHARS)
        if end <= self.sent:
            return "", None
        ready, self.sent = self.text[self.sent : end], end
        return ready, None

    def since(self) -> int:
        """Where a check of the text past `checked` starts: after a whitespace character (so a PII
        pattern's look-behind reads the same as in the whole text), at or before the first word that a
        blocked phrase (words joined by whitespace) ending past `checked` could begin with, and at least
        PII_WINDOW_CHARS before `checked`. Matches that end within text[:checked] were looked for before."""
        start = max(0, self.checked - PII_WINDOW_CHARS)
        words = self.hold_words + 1  # a phrase's words; the last may run past `checked`
        pos = self.checked
        while words and pos > start:
            while pos > 0 and _SPACE.match(self.text[pos - 1]):
                pos -= 1
            while pos > 0 and not _SPACE.match(self.text[pos - 1]):
                pos -= 1
            words -= 1
        start = min(start, pos)
        while start > 0 and not _SPACE.match(self.text[start - 1]):
            start -= 1
        return start

    def _back(self, end: int, words: int) -> int:
        """`end` moved back over a trailing part-word, then over `words` whole words (never before what was sent)."""
        while end > self.sent and _WORD_CHAR.match(self.text[end - 1]):
            end -= 1
        for _ in range(words):
            while end > self.sent and not _WORD_CHAR.match(self.text[end - 1]):
                end -= 1
            while end > self.sent and _WORD_CHAR.match(self.text[end - 1]):
                end -= 1
        return end


def _message_texts(content: Any) -> list[str]:
    # OpenAI content is a string or a list of parts; only {"type": "text", "text": ...} parts carry text.
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return []


def check_messages(rules: FilterRules, messages: Sequence[Mapping[str, Any]]) -> Violation | None:
    """The first violation in any chat message's content, in message order, or None."""
    if not rules.is_active:
        return None
    for message in messages:
        for text in _message_texts(message.get("content")):
            violation = check(rules, text)
            if violation:
                return violation
    return None
