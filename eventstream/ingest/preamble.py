"""What a TCP connection does before its events are read: the optional HELLO frame (auth.py).

The first frame of every connection is looked at once: a HELLO is taken off the stream (checked
against the tokens when some are configured, ignored otherwise); anything else is the first event
frame when no tokens are configured, and a refusal when some are. The bytes that follow go to the
frame decoder unchanged. Sans-I/O: the reader feeds bytes and acts on the answer.
"""

from __future__ import annotations

from eventstream.ingest.auth import Principal, TokenSet
from eventstream.protocol.frames import HELLO_ABSENT, HELLO_NEED_MORE, parse_hello

REFUSE_NO_HELLO = "auth: the connection must open with a HELLO frame carrying a valid token"
REFUSE_BAD_TOKEN = "auth: the token is not valid"


class Preamble:
    """The first bytes of one connection until its first frame is known."""

    __slots__ = ("tokens", "buf", "principal")

    def __init__(self, tokens: TokenSet | None):
        self.tokens = tokens
        self.buf = bytearray()
        self.principal: Principal | None = None  # of the accepted token (None: no tokens configured)

    def feed(self, data) -> tuple[bytes | None, str]:
        """(bytes for the decoder, "") once the preamble is over; (None, "") while more bytes are
        needed; (None, reason) when the connection must be refused (reason starts with "auth:")."""
        self.buf += data
        status, consumed, token = parse_hello(self.buf)
        if status == HELLO_NEED_MORE:
            return None, ""
        if status == HELLO_ABSENT:
            if self.tokens is not None:
                return None, REFUSE_NO_HELLO
            return bytes(self.buf), ""
        if status != "ok":
            return None, status
        if self.tokens is not None:
            self.principal = self.tokens.identify(token)
            if self.principal is None:
                return None, REFUSE_BAD_TOKEN
        return bytes(memoryview(self.buf)[consumed:]), ""
