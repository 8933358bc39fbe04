"""Subscribing over the wire (docs/protocol.md, "Subscribe"): a blocking iterator of stored events.

    from eventstream.client import subscribe

    with subscribe("127.0.0.1", 9002, "orders.*", start="earliest", group="billing") as sub:
        for ev in sub:                  # ev.offset, ev.topic, ev.payload, ev.event_id, ...
            handle(ev)
            sub.commit()                # the group resumes after ev when restarted (at-least-once)

    with subscribe("127.0.0.1", 9002, "orders.*", follow=False) as sub:
        for batch in sub.batches():     # columns: batch.offsets, .event_ids, .payload_block(), ...
            handle_many(batch)

Delivery: many events per DELIVER_BATCH frame (its record table decoded with one numpy.frombuffer),
unless `batch=False` asks for one DELIVER frame per event. `batches()` / `poll_batch()` hand the events
over as columns (protocol.subscribe.DeliverBatch), with no Python object per event; the per-event
iterator and `poll()` are built on the same batches.

Flow control: the client grants `credit` events when it subscribes and grants more as the caller takes
them (once half of it is used), so the server never sends more than `credit` events ahead of the
caller. `follow=False` ends the iteration once the events stored at subscription time are delivered.

Security: `token=` sends a HELLO first; `tls=True` (system trust store) or `ssl_context=` speaks TLS
(`server.tls`). The socket is only ever used by the caller's thread, so no lock is needed.
"""

from __future__ import annotations

import collections
import socket
import ssl
import time

from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import encode_hello


class SubscribeError(ConnectionError):
    """The server refused the subscription or broke it off: its reason (naming what is allowed)."""


def start_of(start) -> tuple[int, int]:
    """`start=` as (mode, value): "earliest", "latest", an int offset, "time:<ns>", or text for parse_start."""
    if isinstance(start, bool):
        raise ValueError(
            f"start={start!r} is not allowed; allowed: 'earliest', 'latest', an offset (int), "
            "or a time ('2026-12-06T10:00:00Z', '<ns>ns')"
        )
    if isinstance(start, int):
        return sp.START_OFFSET, start
    if isinstance(start, tuple):
        return start
    return sp.parse_start(str(start))


class SubscriberState:
    """The client side of a subscription without I/O (shared by Subscription and the asyncio client):
    feed it what the server sent, take events (or whole batches) from it; it says when to grant credit.

    Received events are kept as batches (protocol.subscribe.DeliverBatch: one per DELIVER_BATCH frame,
    decoded with one numpy.frombuffer; DELIVER frames received together make one). take_batch() hands
    a batch over as it is; take() makes per-event objects for one batch at a time."""

    def __init__(self, credit: int):
        if credit < 1:
            raise ValueError(f"credit={credit!r} is not allowed; allowed: at least 1")
        self.credit = credit
        self._dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 30)
        # received, not taken: DeliverBatch (a DELIVER_BATCH frame) or a list of Delivered (DELIVER frames)
        self._batches: collections.deque[sp.DeliverBatch | list[sp.Delivered]] = collections.deque()
        self._front: sp.DeliverBatch | list[sp.Delivered] | None = None  # what take() is in, from _i on
        self._front_events: list[sp.Delivered] = []
        self._i = 0
        self._commits: collections.deque[int] = collections.deque()
        self._used = 0  # events taken by the caller since the last CREDIT
        self.ended = False
        self.end_offset: int | None = None
        self.next_offset: int | None = None  # after the last event returned
        self.taken = 0  # events returned to the caller on this connection (what a commit sends)

    def receive(self, data: bytes) -> None:
        """Bytes from the server (b"": it closed the connection). SubscribeError on a SUB_ERROR, or
        when the server closes before END."""
        if not data:
            if not self.ended:
                raise SubscribeError("the server closed the subscription")
            return
        singles: list[sp.Delivered] = []
        for f in self._dec.feed(data):
            if f.kind == sp.KIND_DELIVER:
                singles.append(sp.parse_deliver(f))
                continue
            if singles:
                self._batches.append(singles)
                singles = []
            if f.kind == sp.KIND_DELIVER_BATCH:
                if f.event_id:
                    self._batches.append(sp.decode_deliver_batch(f))
            elif f.kind == sp.KIND_COMMIT:
                self._commits.append(f.event_id)
            elif f.kind == sp.KIND_END:
                self.ended = True
                self.end_offset = f.event_id
            elif f.kind == sp.KIND_SUB_ERROR:
                raise SubscribeError(f.payload.decode("utf-8", "replace"))
        if singles:
            self._batches.append(singles)

    def has_event(self) -> bool:
        return bool(self._batches) or self._i < len(self._front_events)

    def _granted(self, n: int) -> bytes:
        """n more events taken: the CREDIT frame to send now (b"" if none is due)."""
        self.taken += n
        self._used += n
        if self._used >= max(1, self.credit // 2) and not self.ended:
            used, self._used = self._used, 0
            return sp.encode_credit(used)
        return b""

    def take(self) -> tuple[sp.Delivered, bytes]:
        """The next received event, and the CREDIT frame to send now (b"" if none is due)."""
        if self._i >= len(self._front_events):
            self._front = self._batches.popleft()
            self._front_events = self._front if isinstance(self._front, list) else self._front.events()
            self._i = 0
        ev = self._front_events[self._i]
        self._i += 1
        self.next_offset = ev.offset + 1
        return ev, self._granted(1)

    def take_batch(self) -> tuple[sp.DeliverBatch, bytes]:
        """The received events not yet taken, as one batch (the rest of the one take() is in, else the
        next received), and the CREDIT frame to send now (b"" if none is due)."""
        if self._front is not None and self._i < len(self._front_events):
            batch = self._front[self._i :]
        else:
            batch = self._batches.popleft()
        if isinstance(batch, list):
            batch = sp.DeliverBatch.of_events(batch)
        self._front, self._front_events, self._i = None, [], 0
        self.next_offset = int(batch.rows["offset"][-1]) + 1
        return batch, self._granted(len(batch))

    def commit_answer(self) -> int | None:
        """The group's durable offset from the oldest unanswered COMMIT, if it came."""
        return self._commits.popleft() if self._commits else None

    def buffered(self) -> int:
        return sum(len(b) for b in self._batches) + len(self._front_events) - self._i


class StateView:
    """Read-only views of a client's SubscriberState (`self.state`)."""

    state: SubscriberState

    @property
    def ended(self) -> bool:
        return self.state.ended

    @property
    def end_offset(self) -> int | None:
        return self.state.end_offset

    @property
    def next_offset(self) -> int | None:
        """The offset after the last event returned (None before the first)."""
        return self.state.next_offset

    @property
    def taken(self) -> int:
        """Events returned to the caller on this connection (what commit() sends)."""
        return self.state.taken


class Subscription(StateView):
    def __init__(
        self,
        host: str,
        port: int,
        glob: str,
        *,
        start="earliest",
        group: str | None = None,
        credit: int = 1000,
        follow: bool = True,
        token: str | bytes | None = None,
        timeout: float = 10.0,
        tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        batch: bool = True,
    ):
        """`batch` (default): the server sends many events per frame (DELIVER_BATCH); False: one DELIVER
        frame per event. Credit counts events either way."""
        mode, value = start_of(start)
        self.state = SubscriberState(credit)
        self.glob = glob
        self.group = group or ""
        self.credit = credit
        self.follow = follow
        self.timeout = timeout
        self.committed: int | None = None
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise SubscribeError(f"cannot connect to {host}:{port} ({exc})") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = ssl_context if ssl_context is not None else (ssl.create_default_context() if tls else None)
        if ctx is not None:
            try:
                self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                self.sock.close()
                raise SubscribeError(f"TLS handshake with {host}:{port} failed: {exc}") from None
        hello = encode_hello(token) if token else b""
        try:
            self.sock.sendall(hello + sp.encode_subscribe(glob, mode, value, credit, self.group, follow, batch))
        except OSError as exc:
            raise SubscribeError(f"connection lost: {exc}") from None

    # ------------------------------------------------------------------------------------ receiving
    def _pump(self, timeout: float | None) -> bool:
        """Read once (waiting up to `timeout`; None = forever); False on timeout."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except OSError as exc:
            raise SubscribeError(f"connection lost: {exc}") from None
        self.state.receive(data)
        return True

    def _wait_event(self, timeout: float | None) -> bool:
        """Until an event is received (True) or END / the timeout (None = forever) comes first."""
        st = self.state
        deadline = None if timeout is None else time.monotonic() + timeout
        while not st.has_event():
            if st.ended:
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._pump(left)
        return True

    def poll(self, timeout: float | None = None) -> sp.Delivered | None:
        """The next event, waiting at most `timeout` seconds (None = forever); None on timeout or at END."""
        if not self._wait_event(timeout):
            return None
        ev, credit = self.state.take()
        if credit:
            self.sock.sendall(credit)
        return ev

    def poll_batch(self, timeout: float | None = None) -> sp.DeliverBatch | None:
        """The events received and not yet taken, as one columnar batch (offsets, event_ids, producer_ts,
        stored_ns, priorities, topics + topic_index, payloads), waiting at most `timeout` seconds for
        one (None = forever); None on timeout or at END. Credit counts its events."""
        if not self._wait_event(timeout):
            return None
        batch, credit = self.state.take_batch()
        if credit:
            self.sock.sendall(credit)
        return batch

    def batches(self):
        """Iterate over batches (poll_batch() until END; forever when following)."""
        while (batch := self.poll_batch(None)) is not None:
            yield batch

    def buffered(self) -> int:
        """Events received and not yet taken (poll() returns them without waiting)."""
        return self.state.buffered()

    def __iter__(self):
        return self

    def __next__(self) -> sp.Delivered:
        ev = self.poll(None)
        if ev is None:
            raise StopIteration
        return ev

    def commit(self, timeout: float | None = None) -> int:
        """Tell the group that every event returned so far is done; returns the group's committed offset
        once the server has stored it durably (the offset a restarted group resumes from)."""
        if not self.group:
            raise SubscribeError("commit() needs a group: subscribe(..., group='name')")
        self.sock.sendall(sp.encode_commit(self.state.taken))
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while (answer := self.state.commit_answer()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(left):
                raise SubscribeError(f"no COMMIT answer within {timeout} s")
        self.committed = answer
        return answer

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def subscribe(host: str, port: int, glob: str, start="earliest", group: str | None = None, **kw) -> Subscription:
    """Subscribe to stored and live events whose topic matches `glob` (fnmatch: `orders.*`).

    start: "earliest", "latest", an offset (int), or a time ("2026-12-06T10:00:00Z", "<ns>ns"). A group
    with a committed offset resumes there whatever `start` says. Keywords: credit, follow, token, timeout,
    tls, ssl_context, batch (default True: many events per frame)."""
    return Subscription(host, port, glob, start=start, group=group, **kw)
