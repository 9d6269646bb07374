"""API keys: the server keeps sha256 digests only; a request sends `Authorization: Bearer KEY`.

Fail-closed: every path is guarded except the liveness and readiness probes, so a route added later
is protected without anyone remembering to. The key's digest is compared with every stored digest in
constant time (hmac.compare_digest), so timing reveals neither a match nor its position (vLLM's way).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.errors import KilnError
from kiln.serve.protocol import error_body

PUBLIC_PATHS = frozenset({"/health", "/ready"})


class ApiKeyFileError(KilnError):
    """The API key file is missing or malformed."""


def load_digests(path: Path) -> list[bytes]:
    """One sha256 hex digest per line (blank lines and # comments skipped); a line may be sha256sum's whole output,
    the digest and then the name it read ("-" for standard input)."""
    try:
        # utf-8-sig: an editor's byte-order mark made the first digest "not a sha256 hex digest"
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise ApiKeyFileError(f"API key file {path} cannot be read ({exc.strerror}); pass an existing file") from exc
    except UnicodeDecodeError as exc:  # a binary file (a key store, the wrong path) was a traceback
        raise ApiKeyFileError(f"API key file {path} is not text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                              "pass a file of sha256 hex digests, one a line") from None
    digests = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        # `printf %s KEY | sha256sum`, which the error below tells users to store, prints "DIGEST  -"
        text = text.split()[0]
        if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise ApiKeyFileError(
                f"{path}:{number}: not a sha256 hex digest; store `printf %s KEY | sha256sum` output, not the key"
            )
        digests.append(bytes.fromhex(text))
    if not digests:
        raise ApiKeyFileError(f"API key file {path} holds no digests; add one sha256 hex digest per line")
    return digests


def key_id(digest: bytes) -> str:
    """A short, non-secret name for a key in logs and rate limits."""
    return digest.hex()[:12]


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, digests: list[bytes]) -> None:
        self.app = app
        self.digests = digests

    def _match(self, header: str) -> bytes | None:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for known in self.digests:  # look at every digest: the time does not depend on which one matches
            if hmac.compare_digest(digest, known):
                found = known
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        digest = self._match(headers.get("authorization", ""))
        if digest is None:
            body = json.dumps(error_body("missing or invalid API key; send Authorization: Bearer KEY",
                                         "authentication_error", code="invalid_api_key")).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["key_id"] = key_id(digest)
        await self.app(scope, receive, send)
