"""Shared client tokens (`server.auth.tokens`, `server.auth.tokens_file`) and the check of a HELLO.

With tokens configured, a TCP connection must open with a HELLO frame (protocol/frames.py,
docs/protocol.md) carrying one of them; the reader (reader.py) refuses anything else with a NACK of
reason ``auth: ...`` (frame index 0: the HELLO is not numbered) and closes the connection. Without
tokens a leading HELLO is accepted and ignored, so a client configured with a token also talks to an
open server.

Tokens are compared with hmac.compare_digest against every configured token (no early exit), so the
time taken does not tell a client how much of a token it got right.

Principals (server.auth.principals): each token belongs to a principal with produce and consume
rights by topic glob. A shared token (server.auth.tokens, tokens_file) is the principal SHARED, which
may do everything; without any token, connections have no principal (None) and no checks. A token's
value is read from the environment or a file at start and never logged or shown: errors name the
variable or file, not the value. Ids: 0 is SHARED, principals are 1.. in configuration order (the small
integer the engine sees, see Principal.id).

Produce: tenants.TopicGate stands in for the topic table of a connection's decoder. The decoder
interns each new topic once per connection (protocol/decoder.py caches the id); the gate refuses a
topic outside the principal's globs by raising Forbidden, which the decoder turns into a rejected
frame (class "forbidden") whose NACK reason names the principal and the topic. So a refused topic is
never added to the shared table.
Consume: Principal.may_subscribe(glob) holds when every topic the glob can match is allowed (checked
conservatively, see there); otherwise the SUBSCRIBE gets a SUB_ERROR.
"""

from __future__ import annotations

import fnmatch
import hmac
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eventstream.core.topics import TopicLimitError
from eventstream.protocol.frames import MAX_TOKEN_BYTES

WILDCARDS = "*?["


class TokenError(ValueError):
    """The token configuration cannot be used; the message names the key."""


@dataclass(eq=False)
class Principal:
    """A client identity: `id` 0 is SHARED (a shared token: every right), 1.. the configured ones."""

    id: int
    name: str
    produce: tuple[str, ...] = ()
    consume: tuple[str, ...] = ()
    unrestricted: bool = False
    key: int = 0  # stable 16-bit key in the dedup key and the log (principal_keys); 0 = SHARED
    _produce_cache: dict = field(default_factory=dict, repr=False)

    def may_produce(self, topic: str) -> bool:
        if self.unrestricted:
            return True
        ok = self._produce_cache.get(topic)
        if ok is None:
            ok = any(fnmatch.fnmatchcase(topic, g) for g in self.produce)
            if len(self._produce_cache) < 65536:
                self._produce_cache[topic] = ok
        return ok

    def may_subscribe(self, glob: str) -> bool:
        """True when every topic `glob` can match is allowed: `glob` is one of the consume globs, or
        has no wildcard and matches one, or a consume glob is a prefix pattern `P*` (no other
        wildcard) and the text of `glob` before its first wildcard starts with P. Anything else is
        refused (sound: a glob is never allowed for a topic the principal may not read)."""
        if self.unrestricted:
            return True
        literal = glob
        for i, ch in enumerate(glob):
            if ch in WILDCARDS:
                literal = glob[:i]
                break
        plain = literal == glob
        for g in self.consume:
            if g == glob or (plain and fnmatch.fnmatchcase(glob, g)):
                return True
            if g.endswith("*") and not any(ch in WILDCARDS for ch in g[:-1]) and literal.startswith(g[:-1]):
                return True
        return False

    def refuse_produce(self, topic: str) -> str:
        return (
            f"forbidden: principal {self.name!r} may not produce to topic {topic!r}; allowed: topics matching "
            f"{', '.join(self.produce) or 'none'} (server.auth.principals)"
        )

    def refuse_subscribe(self, glob: str) -> str:
        return (
            f"forbidden: principal {self.name!r} may not consume topic glob {glob!r}; allowed: globs within "
            f"{', '.join(self.consume) or 'none'} (server.auth.principals)"
        )


SHARED = Principal(0, "shared", ("*",), ("*",), unrestricted=True)


class Forbidden(TopicLimitError):
    """A topic the connection's principal may not produce to (the decoder's rejected-topic path)."""

    error_class = "forbidden"

    def __init__(self, reason: str):
        self.limit = 0
        OverflowError.__init__(self, reason)


def _principal_token(p, i: int) -> bytes:
    where = f"server.auth.principals[{i}] ({p.name})"
    if p.token_env:
        value = os.environ.get(p.token_env, "")
        if not value:
            raise TokenError(
                f"{where}.token_env: environment variable {p.token_env} is not set or empty; "
                "allowed: the name of a variable holding the token"
            )
        token = value.strip()
    else:
        try:
            text = Path(p.token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenError(
                f"{where}.token_file: cannot read {p.token_file} ({exc.strerror}); allowed: a readable "
                "file holding the token"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            raise TokenError(
                f"{where}.token_file: {p.token_file} holds no token; allowed: a file whose first "
                "line that is not blank or a # comment is the token"
            )
        token = lines[0]
    raw = token.encode("utf-8")
    if not raw or len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"{where}: a token of {len(raw)} bytes is not allowed; allowed: 1..{MAX_TOKEN_BYTES} bytes")
    return raw


def principal_keys(names: list[str]) -> dict[str, int]:
    """The stable 16-bit key of each principal (1..65535; 0 is no principal or a shared token): what
    its events carry into the dedup key and the log (core/records.py `principal`), so an id one
    principal sends never stands for another's, also after a restart that rebuilds the tables from
    the log. A key depends on the name, not on the order of the configuration: crc32 of the name,
    folded to 16 bits; names whose keys meet are taken in sorted order and the later one moves to the
    next free key (so only the set of such colliding names must stay the same across restarts)."""
    taken: dict[int, str] = {}
    out: dict[str, int] = {}
    for name in sorted(names):
        h = zlib.crc32(name.encode("utf-8"))
        k = ((h >> 16) ^ h) & 0xFFFF or 1
        while k in taken:
            k = k % 0xFFFF + 1
        taken[k] = name
        out[name] = k
    return out


class TokenSet:
    def __init__(self, tokens: list[str] | list[bytes], principals: Sequence[tuple[bytes, Principal]] = ()):
        """`tokens`: shared tokens (principal SHARED); `principals`: (token, Principal) pairs."""
        self._tokens = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in tokens]
        self._owners: list[Principal] = [SHARED] * len(self._tokens)
        for token, p in principals:
            self._tokens.append(token)
            self._owners.append(p)
        self.principals = [SHARED] + [p for _, p in principals]  # by id

    def identify(self, token: bytes) -> Principal | None:
        """The principal whose token this is (None: no such token). Compares with every token."""
        found = None
        for t, p in zip(self._tokens, self._owners, strict=True):
            if hmac.compare_digest(t, token) and found is None:
                found = p
        return found

    @classmethod
    def from_config(cls, auth) -> TokenSet | None:
        """The tokens of an AuthConfig (list plus file), or None when none are configured."""
        tokens = list(auth.tokens)
        for i, t in enumerate(tokens):
            if not t or len(t.encode("utf-8")) > MAX_TOKEN_BYTES:
                raise TokenError(
                    f"server.auth.tokens[{i}]: a token of {len(t.encode('utf-8'))} bytes is not "
                    f"allowed; allowed: 1..{MAX_TOKEN_BYTES} bytes"
                )
        if auth.tokens_file:
            try:
                text = Path(auth.tokens_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenError(
                    f"server.auth.tokens_file: cannot read {auth.tokens_file} ({exc.strerror}); "
                    "allowed: a readable file with one token per line"
                ) from None
            for n, line in enumerate(text.splitlines(), 1):
                t = line.strip()
                if not t or t.startswith("#"):
                    continue
                if len(t.encode("utf-8")) > MAX_TOKEN_BYTES:
                    raise TokenError(
                        f"server.auth.tokens_file: {auth.tokens_file}:{n}: token longer than "
                        f"{MAX_TOKEN_BYTES} bytes is not allowed"
                    )
                tokens.append(t)
            if not tokens:
                raise TokenError(
                    f"server.auth.tokens_file: {auth.tokens_file} has no token; allowed: a file "
                    "with one token per line (or an empty tokens_file: no authentication)"
                )
        pairs: list[tuple[bytes, Principal]] = []
        seen = {t.encode("utf-8") for t in tokens}
        for i, pc in enumerate(getattr(auth, "principals", ())):
            raw = _principal_token(pc, i)
            if raw in seen:
                raise TokenError(
                    f"server.auth.principals[{i}] ({pc.name}): its token is also another principal's "
                    "or a shared token; allowed: a token of its own"
                )
            seen.add(raw)
            pairs.append((raw, Principal(i + 1, pc.name, tuple(pc.produce), tuple(pc.consume))))
        keys = principal_keys([p.name for _, p in pairs])
        for _, p in pairs:
            p.key = keys[p.name]
        return cls(tokens, pairs) if tokens or pairs else None

    def __len__(self) -> int:
        return len(self._tokens)

    def check(self, token: bytes) -> bool:
        ok = False
        for t in self._tokens:
            ok |= hmac.compare_digest(t, token)
        return ok
