"""The API key file behind --api-key-file: what lines it takes and how it refuses the rest."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from kiln.serve.auth import ApiKeyFileError, load_digests

SECRET = "secret"
DIGEST = hashlib.sha256(SECRET.encode()).digest()


def test_the_output_of_sha256sum_is_taken_as_it_is(tmp_path: Path) -> None:
    # the error message tells users to store `printf %s KEY | sha256sum`, which prints "DIGEST  -": it was refused
    keys = tmp_path / "keys"
    keys.write_bytes(subprocess.run(["sha256sum"], input=SECRET.encode(), capture_output=True, check=True).stdout)
    assert load_digests(keys) == [DIGEST]


def test_a_plain_key_is_still_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("my secret key\n")
    with pytest.raises(ApiKeyFileError, match="keys:1: not a sha256 hex digest"):
        load_digests(keys)


def test_a_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xef\xbb\xbf" + DIGEST.hex().encode() + b"\r\n")
    assert load_digests(keys) == [DIGEST]


def test_a_binary_file_is_one_line_naming_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.der"
    keys.write_bytes(b"\x30\x82\xff\xfe")
    with pytest.raises(ApiKeyFileError, match=r"keys.der is not text \(byte 1 is 0x82\)"):
        load_digests(keys)
