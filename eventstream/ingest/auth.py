"""Shared client tokens (`server.auth.tokens`, `server.auth.tokens_file`) and the check of a HELLO.

With tokens configured, a TCP connection must open with a HELLO frame (protocol/frames.py,
docs/protocol.md) carrying one of them; the reader (reader.py) refuses anything else with a NACK of
reason ``auth: ...`` (frame index 0: the HELLO is not numbered) and closes the connection. Without
tokens a leading HELLO is accepted and ignored, so a client configured with a token also talks to an
open server.

Tokens are compared with hmac.compare_digest against every configured token (no early exit), so the
time taken does not tell a client how much of a token it got right.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from eventstream.protocol.frames import MAX_TOKEN_BYTES


class TokenError(ValueError):
    """The token configuration cannot be used; the message names the key."""


class TokenSet:
    def __init__(self, tokens: list[str] | list[bytes]):
        self._tokens = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in tokens]

    @classmethod
    def from_config(cls, auth) -> TokenSet | None:
        """The tokens of an AuthConfig (list plus file), or None when none are configured."""
        tokens = list(auth.tokens)
        for i, t in enumerate(tokens):
            if not t or len(t.encode("utf-8")) > MAX_TOKEN_BYTES:
                raise TokenError(f"server.auth.tokens[{i}]: a token of {len(t.encode('utf-8'))} bytes is not "
                                 f"allowed; allowed: 1..{MAX_TOKEN_BYTES} bytes")
        if auth.tokens_file:
            try:
                text = Path(auth.tokens_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenError(f"server.auth.tokens_file: cannot read {auth.tokens_file} ({exc.strerror}); "
                                 "allowed: a readable file with one token per line") from None
            for n, line in enumerate(text.splitlines(), 1):
                t = line.strip()
                if not t or t.startswith("#"):
                    continue
                if len(t.encode("utf-8")) > MAX_TOKEN_BYTES:
                    raise TokenError(f"server.auth.tokens_file: {auth.tokens_file}:{n}: token longer than "
                                     f"{MAX_TOKEN_BYTES} bytes is not allowed")
                tokens.append(t)
            if not tokens:
                raise TokenError(f"server.auth.tokens_file: {auth.tokens_file} has no token; allowed: a file "
                                 "with one token per line (or an empty tokens_file: no authentication)")
        return cls(tokens) if tokens else None

    def __len__(self) -> int:
        return len(self._tokens)

    def check(self, token: bytes) -> bool:
        ok = False
        for t in self._tokens:
            ok |= hmac.compare_digest(t, token)
        return ok
