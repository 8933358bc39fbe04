"""Clients for the ingest ports: TcpClient (v1/v2, ACKs, retries) and UdpSender; subscribe() for the
subscribe port (sync iterator) and eventstream.client.aio (asyncio: AsyncSender, aio_subscribe)."""

from eventstream.client.aio import AsyncSender, AsyncSubscription, aio_subscribe
from eventstream.client.subscriber import SubscribeError, Subscription, subscribe
from eventstream.client.tcp import AuthError, ClientError, TcpClient
from eventstream.client.udp import UdpSender

__all__ = [
    "AsyncSender",
    "AsyncSubscription",
    "AuthError",
    "ClientError",
    "SubscribeError",
    "Subscription",
    "TcpClient",
    "UdpSender",
    "aio_subscribe",
    "subscribe",
]
