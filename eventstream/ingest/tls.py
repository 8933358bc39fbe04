"""TLS on every TCP port (`server.tls.cert_file`, `key_file`; off by default), with stdlib ssl.

One `server.tls` section, one server context (server_context), used by the ingest port, the
subscribe port and the metrics/health port (unless `metrics.tls: false`).

The TCP ingest readers keep their non-blocking selector loop: an accepted socket is wrapped with
``do_handshake_on_connect=False`` and the handshake is driven by the loop (handshake_step): it wants
to read or to write until it is done. After it, reads may raise SSLWantReadError (a TLS record is
not complete yet: like EAGAIN) and a read may leave decrypted bytes inside the SSL object that the
selector cannot see (``sock.pending()``): the reader reads those before it sleeps again.

A client that speaks plain text to a TLS port is told why, in plain text, instead of getting a bare
reset (handshake_step answers it with `plain_answer`, a NACK of frame 0 on the ingest port; the
subscribe port sends a SUB_ERROR, the metrics port an HTTP 400).
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl

from eventstream.protocol.frames import encode_nack

TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello
PLAIN_TEXT_REASON = (
    "tls: this port requires TLS and the client spoke plain text; allowed: a TLS client "
    "(--tls or --tls-ca FILE on the command line; tls=True or ssl_context= in the clients)"
)

# OpenSSL reasons meaning "the peer did not start a TLS handshake at all"
_PLAIN_REASONS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNKNOWN_PROTOCOL",
    "UNSUPPORTED_PROTOCOL",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "WRONG_SSL_VERSION",
}


class TlsConfigError(ValueError):
    """The certificate or key cannot be loaded; the message names the key."""


class PlainTextClient(ssl.SSLError):
    """The peer spoke plain text to a TLS port (it was told why: see handshake_step)."""


def server_context(cert_file: str, key_file: str, key: str = "server.tls") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        which = f"{key}.cert_file" if exc.filename in (None, cert_file) else f"{key}.key_file"
        raise TlsConfigError(f"{which}: {exc.filename or cert_file} does not exist; allowed: a PEM file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"{key}.cert_file/key_file: cannot load {cert_file} with {key_file} "
            f"({exc}); allowed: a PEM certificate chain and its private key"
        ) from None
    return ctx


def from_config(tls) -> ssl.SSLContext | None:
    """The server context of a TlsConfig (`server.tls`), or None when TLS is off (no cert_file)."""
    return server_context(tls.cert_file, tls.key_file) if tls.cert_file else None


def is_plain_text(exc: BaseException) -> bool:
    """True when a failed server handshake means the client did not speak TLS at all."""
    return isinstance(exc, ssl.SSLError) and (getattr(exc, "reason", None) in _PLAIN_REASONS)


def plain_answer(sock: socket.socket, data: bytes) -> None:
    """Write `data` in clear text under a failed TLS handshake (the SSL layer is dead, the TCP
    connection is not) and half-close, so the client reads why before the connection ends. What the
    client already sent is read and discarded first: closing with unread bytes would send a reset,
    and a reset can destroy the answer before the client reads it."""
    fd = sock.fileno()
    if fd < 0:
        return
    raw = socket.socket(fileno=os.dup(fd))  # a plain view of the same TCP connection
    try:
        raw.setblocking(False)
        try:
            while raw.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        raw.setblocking(True)
        raw.settimeout(0.5)
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        raw.close()


def handshake_step(sock: ssl.SSLSocket) -> int:
    """Advance the handshake: 0 when done, else the selector event it waits for. Raises
    ssl.SSLError / OSError when it failed (the connection should close); PlainTextClient (an
    SSLError) after telling a plain-text client, with a NACK of frame 0, that this port needs TLS."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    except ssl.SSLError as exc:
        if is_plain_text(exc):
            plain_answer(sock, encode_nack(0, PLAIN_TEXT_REASON))
            raise PlainTextClient(PLAIN_TEXT_REASON) from None
        raise
    return 0
