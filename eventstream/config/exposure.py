"""Exposure: which listeners of a configuration anyone on the network may reach without credentials
or read in clear text. `eventstream serve` logs each as a warning (exposed_without_protection)."""

from __future__ import annotations

import ipaddress

from eventstream.config.schema import Config


def exposure_warnings(cfg: Config) -> list[str]:
    """Why this configuration may be reachable by anyone, or readable on the wire: one line per
    non-loopback port without TLS or without client tokens (UDP has neither)."""
    out = []
    s = cfg.server
    tls = bool(s.tls.cert_file)
    auth = bool(s.auth.tokens or s.auth.tokens_file or s.auth.principals)
    ports = [
        ("server.tcp", s.tcp.enabled, s.tcp.host, tls, auth, "anyone reaching it can write events"),
        (
            "server.subscribe",
            s.subscribe.enabled,
            s.subscribe.host,
            tls,
            auth,
            "anyone reaching it can read every stored event",
        ),
        (
            "metrics",
            cfg.metrics.enabled,
            cfg.metrics.host,
            tls and cfg.metrics.tls,
            auth and cfg.metrics.auth,
            "anyone reaching it can read the metrics",
        ),
    ]
    for key, enabled, host, has_tls, has_auth, what in ports:
        if not enabled or loopback(host):
            continue
        missing = [
            m
            for m, ok in (
                ("TLS (server.tls.cert_file" + (", metrics.tls" if key == "metrics" else "") + ")", has_tls),
                ("client tokens (server.auth.tokens" + (", metrics.auth" if key == "metrics" else "") + ")", has_auth),
            )
            if not ok
        ]
        if missing:
            out.append(
                f"{key}.host {host} is not a loopback address and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not configured: "
                + ("traffic is readable on the wire" if not has_tls else what)
                + ("" if has_tls or has_auth else f", and {what}")
            )
    if s.udp.enabled and not loopback(s.udp.host):
        out.append(
            f"server.udp.host {s.udp.host} is not a loopback address: UDP has no authentication "
            "and no encryption (anyone reaching it can write events)"
        )
    return out


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
