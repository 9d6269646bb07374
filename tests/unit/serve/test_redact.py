"""PII redaction finds e-mails, phones and Luhn-valid cards in their usual shapes and leaves other numbers alone."""

from __future__ import annotations

import pytest

from kiln.serve.redact import find_pii, luhn_ok, redact

EMAILS = [
    "john.doe@example.com",
    "john.doe+tag@example.co.uk",
    "A_B-c%d@sub.mail-server.example.org",
    "x1@x2.io",
    "UPPER@EXAMPLE.COM",
]

PHONES = [
    "+1 (555) 123-4567",
    "+1 555 123 4567",
    "+15551234567",
    "+44 20 7946 0958",
    "+49 151 12345678",
    "+33 6 12 34 56 78",
    "+91-98765-43210",
    "(555) 123-4567",
    "(555)123-4567",
    "555-123-4567",
    "555.123.4567",
    "555 123 4567",
    "1-800-555-0199",
    "020 7946 0958",
    "07911 123456",
    "06 12 34 56 78",
    "030-12345678",
    "0044 20 7946 0958",
]

CARDS = [
    "4111 1111 1111 1111",  # Visa test number
    "4111-1111-1111-1111",
    "4111111111111111",
    "5500 0000 0000 0004",  # Mastercard
    "3782 822463 10005",  # Amex, 4-6-5
    "378282246310005",
    "6011 1111 1111 1117",  # Discover
    "4222222222222",  # 13-digit Visa
    "4111 1111 1111 1111 003",  # 19 digits
]

NOT_PII = [
    "The year 2024 was warm.",
    "Released in 1999, 2005 and 2024.",
    "between 2019 2020 2021 2022",
    "kiln 1.2.3 and torch 2.13.0",
    "Windows build 10.0.19041.1234",
    "pi is 3.14159265358979",
    "server at 192.168.100.200 port 8080",
    "order #12345 shipped",
    "call me at 5 pm",
    "local 555-1234",
    "on 2024-01-15 at 12:30",
    "timestamp 1700000000",
    "id 1234567890123456",  # 16 digits, fails Luhn
    "4111 1111 1111 1112",  # a card number with a wrong check digit
    "0000 0000 0000 0000",  # passes Luhn but is a placeholder
    "total $1,234,567.89",
    "population 1 234 567 890",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha 3f786850e387550fdab836ed7e6dc881de23001b",
    "user@localhost and a@b",
    "twelve digits 123456789012",
    "ISBN 978-0-306-40615-7",
    "matrix 512 x 2048 x 4096",
]


@pytest.mark.parametrize("email", EMAILS)
def test_emails_are_redacted(email: str) -> None:
    text, counts = redact(f"write to {email}, please")
    assert text == "write to [EMAIL], please"
    assert counts == {"email": 1, "phone": 0, "card": 0}


@pytest.mark.parametrize("phone", PHONES)
def test_phones_are_redacted(phone: str) -> None:
    text, counts = redact(f"call {phone} today.")
    assert text == "call [PHONE] today."
    assert counts == {"email": 0, "phone": 1, "card": 0}


@pytest.mark.parametrize("card", CARDS)
def test_luhn_valid_cards_are_redacted(card: str) -> None:
    text, counts = redact(f"my card is {card}.")
    assert text == "my card is [CARD]."
    assert counts == {"email": 0, "phone": 0, "card": 1}


@pytest.mark.parametrize("text", NOT_PII)
def test_other_numbers_and_strings_are_kept(text: str) -> None:
    assert redact(text) == (text, {"email": 0, "phone": 0, "card": 0})


def test_card_next_to_other_numbers_is_found_inside_the_run() -> None:
    assert redact("qty 2 4111 1111 1111 1111")[0] == "qty 2 [CARD]"
    assert redact("4111 1111 1111 1111 2024")[0] == "[CARD] 2024"


def test_mixed_text_counts_every_kind() -> None:
    text = ("Reach ann@example.com or bob@example.org, phone +44 20 7946 0958 or (555) 123-4567, "
            "card 4111 1111 1111 1111, in 2024 with kiln 1.2.3.")
    redacted, counts = redact(text)
    assert redacted == ("Reach [EMAIL] or [EMAIL], phone [PHONE] or [PHONE], card [CARD], in 2024 with kiln 1.2.3.")
    assert counts == {"email": 2, "phone": 2, "card": 1}
    assert find_pii(text) == counts


def test_email_with_digits_is_one_email_not_a_phone() -> None:
    assert redact("5551234567@sms.example.net") == ("[EMAIL]", {"email": 1, "phone": 0, "card": 0})


def test_redaction_is_idempotent_and_empty_text_is_fine() -> None:
    once = redact("mail a.b@example.com, card 4111111111111111, tel 555-123-4567")[0]
    assert redact(once) == (once, {"email": 0, "phone": 0, "card": 0})
    assert redact("") == ("", {"email": 0, "phone": 0, "card": 0})


def test_find_pii_reports_every_kind_even_when_zero() -> None:
    assert find_pii("nothing here") == {"email": 0, "phone": 0, "card": 0}
    assert find_pii("a@example.com 555-123-4567 555-987-6543") == {"email": 1, "phone": 2, "card": 0}


@pytest.mark.parametrize(("digits", "valid"), [
    ("79927398713", True), ("4111111111111111", True), ("378282246310005", True),
    ("4111111111111112", False), ("1234567890123456", False), ("79927398710", False),
])
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_ok(digits) is valid


def test_long_adversarial_inputs_are_handled() -> None:
    # Long digit runs and near-e-mails must not make the regexes backtrack badly; all stay unredacted.
    for text in ("1 " * 20000 + "1a", "a." * 20000 + "@", "x@" + "a." * 20000 + "-", "0 12 " * 5000):
        redacted, counts = redact(text)
        assert counts["email"] == 0 and counts["card"] == 0
        assert len(redacted) <= len(text)
