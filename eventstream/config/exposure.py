"""Exposure: which listeners of a configuration anyone on the network may reach without credentials."""

from __future__ import annotations

import ipaddress

from eventstream.config.schema import Config


def exposure_warnings(cfg: Config) -> list[str]:
    """Why this configuration may be reachable by anyone (serve logs each as a warning)."""
    out = []
    tcp, udp = cfg.server.tcp, cfg.server.udp
    auth = bool(cfg.server.auth.tokens or cfg.server.auth.tokens_file)
    if tcp.enabled and not loopback(tcp.host) and not (tcp.tls.cert_file or auth):
        out.append(f"server.tcp.host {tcp.host} is not a loopback address and neither TLS "
                   "(server.tcp.tls.cert_file) nor client tokens (server.auth.tokens) are configured")
    sub = cfg.server.subscribe
    if sub.enabled and not loopback(sub.host) and not auth:
        out.append(f"server.subscribe.host {sub.host} is not a loopback address and no client tokens "
                   "(server.auth.tokens) are configured: anyone reaching it can read every stored event")
    if udp.enabled and not loopback(udp.host):
        out.append(f"server.udp.host {udp.host} is not a loopback address: UDP has no authentication "
                   "and no encryption")
    return out


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
