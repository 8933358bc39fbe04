"""asyncio clients: AsyncSender (v2 events, waits for ACKs) and AsyncSubscription (docs/protocol.md).

    sender = await AsyncSender.connect("127.0.0.1", 9000)
    await sender.send("orders.eu", b"...", event_id=7)
    await sender.flush()                     # every event sent so far is ACKed (or NACKed: sender.nacks)
    await sender.close()

    sub = await aio_subscribe("127.0.0.1", 9002, "orders.*", group="billing")
    async for ev in sub:
        ...
        await sub.commit()

The sender sends BATCH frames by default (`frame="batch"`): events given to send() in one turn of the
event loop leave together in one frame (linger_ms 0: nothing waits to fill a batch), or after
`linger_ms` when it is set, in frames of up to `batch_bytes`; `frame="single"` sends one v2 EVENT
frame per event. ACKs count events either way.

The sender does not resend on reconnect (TcpClient does); it reports what was not ACKed when the
connection breaks (ClientError). Flow control of the subscription is as in client/subscriber.py.
"""

from __future__ import annotations

import asyncio

from eventstream.client.subscriber import StateView, SubscribeError, SubscriberState, start_of
from eventstream.client.tcp import FRAMES, ClientError, _Pending, encode_batches
from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import (
    KIND_ACK,
    KIND_NACK,
    EventIds,
    check_event,
    encode_hello,
    encode_v2,
    split_control_frames,
)


class AsyncSender:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        frame: str = "batch",
        linger_ms: float = 0.0,
        batch_bytes: int = 256 << 10,
    ):
        if frame not in FRAMES:
            raise ValueError(f"frame={frame!r} is not allowed; allowed: {', '.join(FRAMES)}")
        if not linger_ms >= 0 or batch_bytes < 1:
            raise ValueError(
                f"linger_ms={linger_ms!r}, batch_bytes={batch_bytes!r} are not allowed; allowed: "
                "linger_ms >= 0, batch_bytes >= 1"
            )
        self.reader = reader
        self.writer = writer
        self.batching = frame == "batch"
        self.linger_s = linger_ms / 1000
        self.batch_bytes = batch_bytes
        self._ids = EventIds()
        self._queued: list[_Pending] = []
        self._queued_bytes = 0
        self._timer: asyncio.Handle | None = None
        self.sent = 0  # events sent on this connection (= the indices they took)
        self.acked = 0
        self.nacks: list[tuple[int, str]] = []  # (frame index, reason)
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_acks())

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 9000,
        *,
        token: str | bytes | None = None,
        ssl=None,
        timeout: float = 10.0,
        frame: str = "batch",
        linger_ms: float = 0.0,
        batch_bytes: int = 256 << 10,
    ) -> AsyncSender:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ssl), timeout)
        except (TimeoutError, OSError) as exc:
            raise ClientError(f"cannot connect to {host}:{port} ({exc!r})") from None
        if token:
            writer.write(encode_hello(token))
        return cls(reader, writer, frame=frame, linger_ms=linger_ms, batch_bytes=batch_bytes)

    async def _read_acks(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    raise ClientError("the server closed the connection")
                buf += data
                for kind, eid, payload in split_control_frames(buf):
                    if kind == KIND_ACK:
                        self.acked = max(self.acked, eid)
                    elif kind == KIND_NACK:
                        self.nacks.append((eid, payload.decode("utf-8", "replace")))
                self._changed.set()
        except BaseException as exc:  # noqa: BLE001 - reported to flush()
            self._error = exc
            self._changed.set()

    async def send(
        self, topic: str, payload: bytes = b"", *, priority: int = 2, event_id: int | None = None, timestamp_ns: int = 0
    ) -> int:
        """Queue one event; returns its event_id (unless given, the connection's next: a random odd start,
        then +1, as TcpClient draws them). With BATCH frames it leaves with the others queued in this turn
        of the event loop (or after linger_ms)."""
        eid = self._ids.next() if event_id is None else event_id
        if not self.batching:
            self.writer.write(encode_v2(topic, payload, priority, eid, timestamp_ns))
            self.sent += 1
        else:
            t = check_event(topic, priority, eid, timestamp_ns)
            p = _Pending(eid, None, t, bytes(payload), priority, timestamp_ns)
            self._queued.append(p)
            self._queued_bytes += p.size
            if self._queued_bytes >= self.batch_bytes:
                self._write_queued()
            elif self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = (
                    loop.call_later(self.linger_s, self._write_queued)
                    if self.linger_s
                    else loop.call_soon(self._write_queued)
                )
        if self.writer.transport.get_write_buffer_size() > 1 << 20:
            await self.writer.drain()
        return eid

    def _write_queued(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._queued, self._queued_bytes = self._queued, [], 0
        if items and not self.writer.is_closing():
            self.writer.write(encode_batches(items, self.batch_bytes))
            self.sent += len(items)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every event sent so far is resolved (ACKed or NACKed)."""
        self._write_queued()
        await self.writer.drain()

        async def wait():
            while self.acked + len(self.nacks) < self.sent:
                if self._error is not None:
                    raise ClientError(f"{self.sent - self.acked - len(self.nacks)} events not ACKed: {self._error}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        self._write_queued()
        self._task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class AsyncSubscription(StateView):
    def __init__(self, reader, writer, group: str, credit: int):
        self.reader = reader
        self.writer = writer
        self.group = group
        self.credit = credit
        self.state = SubscriberState(credit)

    async def _pump(self) -> None:
        self.state.receive(await self.reader.read(1 << 20))

    async def _wait_event(self) -> bool:
        st = self.state
        while not st.has_event():
            if st.ended:
                return False
            await self._pump()
        return True

    async def next(self) -> sp.Delivered | None:
        """The next event (None at END)."""
        if not await self._wait_event():
            return None
        ev, credit = self.state.take()
        if credit:
            self.writer.write(credit)
        return ev

    async def next_batch(self) -> sp.DeliverBatch | None:
        """The events received and not yet taken, as one columnar batch (None at END); see
        Subscription.poll_batch."""
        if not await self._wait_event():
            return None
        batch, credit = self.state.take_batch()
        if credit:
            self.writer.write(credit)
        return batch

    async def batches(self):
        """Async iteration over batches until END (forever when following)."""
        while (batch := await self.next_batch()) is not None:
            yield batch

    def __aiter__(self):
        return self

    async def __anext__(self) -> sp.Delivered:
        ev = await self.next()
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def commit(self, timeout: float = 10.0) -> int:
        """As Subscription.commit: every event returned so far is done; returns the group's durable
        committed offset (SubscribeError when no answer comes within `timeout` seconds)."""
        if not self.group:
            raise SubscribeError("commit() needs a group")
        self.writer.write(sp.encode_commit(self.state.taken))
        await self.writer.drain()

        async def answer() -> int:
            while (offset := self.state.commit_answer()) is None:
                await self._pump()
            return offset

        try:
            return await asyncio.wait_for(answer(), timeout)
        except TimeoutError:
            raise SubscribeError(f"no COMMIT answer within {timeout} s") from None

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def aio_subscribe(
    host: str,
    port: int,
    glob: str,
    start="earliest",
    group: str | None = None,
    *,
    credit: int = 1000,
    follow: bool = True,
    token: str | bytes | None = None,
    timeout: float = 10.0,
    ssl=None,
    batch: bool = True,
) -> AsyncSubscription:
    """`ssl`: an SSLContext (or True) to speak TLS to a server with server.tls configured. `batch`
    (default): many events per frame (DELIVER_BATCH); False: one DELIVER frame per event."""
    mode, value = start_of(start)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ssl), timeout)
    except (TimeoutError, OSError) as exc:
        raise SubscribeError(f"cannot connect to {host}:{port} ({exc!r})") from None
    writer.write(
        (encode_hello(token) if token else b"")
        + sp.encode_subscribe(glob, mode, value, credit, group or "", follow, batch)
    )
    await writer.drain()
    return AsyncSubscription(reader, writer, group or "", credit)
