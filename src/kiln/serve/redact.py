"""PII redaction: e-mail addresses, phone numbers and payment card numbers become [EMAIL], [PHONE], [CARD].

Hand-written regexes because no small, well-kept library does this offline (Presidio needs spaCy models,
scrubadub is unmaintained). Precision over recall: a number is a phone only in a recognised shape, a card only
when grouped as cards are printed and passing the Luhn check. What to do about PII is left to the callers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

PiiKind = Literal["email", "phone", "card"]
KINDS: tuple[PiiKind, ...] = ("email", "phone", "card")
PLACEHOLDERS: dict[PiiKind, str] = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}
DESCRIPTIONS: dict[PiiKind, str] = {"email": "email address", "phone": "phone number", "card": "payment card number"}

# local@domain.tld; the domain's labels cannot start or end with '-', the TLD is letters only.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![\w-])"
)

# A run of digit groups joined by single spaces or dashes; cards are searched inside it group by group.
# Not after '+' (an international phone) or '.' / a word character (decimals, versions, identifiers).
_DIGIT_RUN = re.compile(r"(?<![\w+.])\d+(?:[ -]\d+)*(?!\w)")
_CARD_MIN_DIGITS, _CARD_MAX_DIGITS = 13, 19
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # 2d, minus 9 when that has two digits

# Phones: three shapes, each bounded so that versions (1.2.3), years, dates and IPv4 addresses stay.
# +CC then 7-14 more digits with light punctuation: +44 20 7946 0958, +1 (555) 123-4567, +15551234567.
_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])\+\d(?:[ .()-]{0,2}\d){7,14}(?!\w)")
# North American 3-3-4 with one separator style per gap, optional leading 1: (555) 123-4567, 555.123.4567.
_PHONE_NANP = re.compile(r"(?<![\w.+-])(?:1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w]|[.-]\d)")
# National numbers with trunk prefix 0 and separators: 020 7946 0958, 06 12 34 56 78, 030-12345678.
# Requiring the leading 0 keeps lists of years ("2019 2020 2021") and grouped amounts out.
_PHONE_NATIONAL = re.compile(r"(?<![\w.+-])0\d{1,4}(?:[ -]\d{2,8}){1,5}(?![\w]|[.-]\d)")
_NATIONAL_DIGITS = (10, 15)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (and ~10% of random numbers)."""
    rev = digits[::-1]  # every second digit from the right is doubled, its digits summed
    total = sum(map(int, rev[0::2])) + sum(_LUHN_DOUBLED[int(ch)] for ch in rev[1::2])
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    # All-same-digit strings (0000 0000 0000 0000) pass Luhn but are placeholders, not cards.
    return _CARD_MIN_DIGITS <= len(digits) <= _CARD_MAX_DIGITS and len(set(digits)) > 1 and luhn_ok(digits)


def _card_shaped(lengths: list[int]) -> bool:
    """Whether digit groups are laid out as cards are printed: one block, fours (the last may be shorter), 4-6-5/4-6-4.

    Checking the layout keeps two neighbouring phone numbers ("555 123 4567 555 987 6543") from being read as one
    card when some span of them happens to pass Luhn.
    """
    return len(lengths) == 1 or all(n == 4 for n in lengths[:-1]) or lengths in ([4, 6, 5], [4, 6, 4])


def _redact_cards_in_run(run: str, counts: dict[str, int]) -> str:
    """Within one run of digit groups, replace the longest group-aligned spans that are cards, left to right.

    Searching inside the run catches a card next to other numbers ("qty 2 4111 1111 1111 1111").
    """
    groups = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\d+", run)]
    out, cursor, i = [], 0, 0
    while i < len(groups):
        found = None
        digits = ""
        for j in range(i, len(groups)):
            digits += groups[j][2]
            if len(digits) > _CARD_MAX_DIGITS:
                break
            if len(digits) < _CARD_MIN_DIGITS:
                continue
            lengths = [len(g[2]) for g in groups[i:j + 1]]
            if _card_shaped(lengths) and _is_card(digits):
                found = j  # keep going: the longest card span wins
        if found is None:
            i += 1
            continue
        out += [run[cursor:groups[i][0]], PLACEHOLDERS["card"]]
        cursor = groups[found][1]
        counts["card"] += 1
        i = found + 1
    return "".join(out) + run[cursor:]


def _sub_counted(pattern: re.Pattern[str], kind: PiiKind, text: str, counts: dict[str, int],
                 accept: Callable[[str], bool] = lambda _: True) -> str:
    def replace(m: re.Match[str]) -> str:
        if not accept(m.group()):
            return m.group()
        counts[kind] += 1
        return PLACEHOLDERS[kind]

    return pattern.sub(replace, text)


def _num_digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def redact(text: str) -> tuple[str, dict[str, int]]:
    """The text with PII replaced by placeholders, and how many of each kind ("email", "phone", "card")."""
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    # Order matters: e-mails first (their local part may hold digits), then cards, then the phone shapes.
    text = _sub_counted(_EMAIL, "email", text, counts)
    text = _DIGIT_RUN.sub(lambda m: _redact_cards_in_run(m.group(), counts), text)
    text = _sub_counted(_PHONE_INTERNATIONAL, "phone", text, counts)
    text = _sub_counted(_PHONE_NANP, "phone", text, counts)
    lo, hi = _NATIONAL_DIGITS
    text = _sub_counted(_PHONE_NATIONAL, "phone", text, counts, lambda s: lo <= _num_digits(s) <= hi)
    return text, counts


def find_pii(text: str) -> dict[str, int]:
    """How many e-mail addresses, phone numbers and card numbers the text holds (every kind is a key)."""
    return redact(text)[1]
