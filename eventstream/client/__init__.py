"""Clients for the ingest ports: TcpClient (v1/v2, ACKs, retries) and UdpSender."""

from eventstream.client.tcp import AuthError, ClientError, TcpClient
from eventstream.client.udp import UdpSender

__all__ = ["AuthError", "ClientError", "TcpClient", "UdpSender"]
