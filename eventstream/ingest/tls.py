"""TLS on the TCP port (`server.tcp.tls.cert_file`, `key_file`; off by default), with stdlib ssl.

The reader threads keep their non-blocking selector loop: an accepted socket is wrapped with
``do_handshake_on_connect=False`` and the handshake is driven by the loop (handshake_step): it wants
to read or to write until it is done. After it, reads may raise SSLWantReadError (a TLS record is
not complete yet: like EAGAIN) and a read may leave decrypted bytes inside the SSL object that the
selector cannot see (``sock.pending()``): the reader reads those before it sleeps again.
"""

from __future__ import annotations

import selectors
import ssl


class TlsConfigError(ValueError):
    """The certificate or key cannot be loaded; the message names the key."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        key = "server.tcp.tls.cert_file" if exc.filename in (None, cert_file) else "server.tcp.tls.key_file"
        raise TlsConfigError(f"{key}: {exc.filename or cert_file} does not exist; allowed: a PEM file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"server.tcp.tls.cert_file/key_file: cannot load {cert_file} with {key_file} "
                             f"({exc}); allowed: a PEM certificate chain and its private key") from None
    return ctx


def handshake_step(sock: ssl.SSLSocket) -> int:
    """Advance the handshake: 0 when done, else the selector event it waits for. Raises
    ssl.SSLError / OSError when it failed (the connection should close)."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    return 0
