"""Event sources of a subscriber session: a private tail, or a consumer group's shared cursor.

Consumer group (docs/protocol.md, "Consumer groups"): the members of one group share one cursor over
the log. A member asks for up to its credit; the group hands out the next events (events that do not
match the group's glob are passed over) and remembers them as *in flight* for that member, in the
order they were sent. A member's COMMIT(n) says "the first n events you sent me on this connection
are done" (a cumulative count, like an ACK: exact even when redelivered events arrive out of offset
order); the group's *committed offset* is
the lowest offset still outstanding (in flight with any member, or read and not yet handed out), or
the cursor when none is. It is stored durably (write, fsync, atomic rename, fsync of the directory)
before the COMMIT answer leaves. When a member leaves, its in-flight events go back to the front of
the queue for the other members; when the last one leaves the group is forgotten except for its
committed offset, where the next member resumes. So delivery is at-least-once: nothing at or after the
committed offset is lost; what a member had not committed may be delivered again.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

from eventstream.protocol import subscribe as sp
from eventstream.storage.tail import LogTail, SegmentIndex, TailBatch


class GroupError(ValueError):
    """A member cannot join or act in its group; the message says why and what is allowed."""


class GroupStore:
    """Committed offsets on disk: one small JSON file per group in `directory`."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # every group's committed offset (for lag, metrics and retention), read once, kept current by save()
        self._offsets: dict[str, int] = {}
        for p in self.dir.glob("*.json"):
            try:
                self._offsets[p.stem] = int(json.loads(p.read_text(encoding="utf-8"))["offset"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # load() names the file when a member of that group joins

    def offsets(self) -> dict[str, int]:
        """Committed offset of every named group that ever committed (live or not)."""
        with self._lock:
            return dict(self._offsets)

    def lowest(self) -> int | None:
        """The lowest committed offset of any named group (None: no group has committed)."""
        with self._lock:
            return min(self._offsets.values(), default=None)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> int | None:
        try:
            return int(json.loads(self._path(name).read_text(encoding="utf-8"))["offset"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GroupError(
                f"group {name!r}: unreadable committed offset in {self._path(name)} ({exc}); "
                "allowed: the JSON file eventstream writes (delete it to start the group anew)"
            ) from None

    def save(self, name: str, offset: int) -> None:
        path = self._path(name)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps({"group": name, "offset": offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a power cut
        finally:
            os.close(dfd)
        with self._lock:
            self._offsets[name] = offset


def open_tail(log_path: Path, dtype, index: SegmentIndex, sub: sp.Subscribe, resume: int | None = None) -> LogTail:
    """A tail positioned as `sub` asks (or at `resume`, a group's committed offset)."""
    if resume is not None:
        return LogTail(log_path, dtype, index, resume)
    if sub.start == sp.START_OFFSET:
        return LogTail(log_path, dtype, index, sub.value)
    if sub.start == sp.START_TIME:
        return LogTail(log_path, dtype, index, 0, since_ns=sub.value)
    tail = LogTail(log_path, dtype, index, 0)
    if sub.start == sp.START_LATEST:
        tail.seek_end()
    return tail


def fill(tail: LogTail, glob: str, cache: dict[str, bool], out: collections.deque[TailBatch]) -> None:
    """Read from `tail` until some events match `glob` (appended to `out` as one batch) or the log has
    no more. Per read, a constant number of numpy operations (and one fnmatch per new topic name)."""
    while not out:
        batch = tail.read_batch()
        if batch is None:
            return
        hits = batch.matching(glob, cache)
        if len(hits):
            out.append(hits)


def take_from(q: collections.deque[TailBatch], n: int) -> TailBatch | None:
    """Up to n events from the front of `q` (never more than its first batch holds): a slice, no copy."""
    if not q:
        return None
    b = q[0]
    if len(b) <= n:
        q.popleft()
        return b
    q[0] = b[n:]
    return b[:n]


def lowest_offset(batches) -> int | None:
    """The lowest offset among `batches` (None if they hold none): one numpy reduction per batch."""
    return min((int(b.rows["offset"].min()) for b in batches if len(b)), default=None)


class SoloSource:
    """A subscriber without a group: its own tail and glob."""

    group = ""

    def __init__(self, tail: LogTail, glob: str):
        self.tail = tail
        self.glob = glob
        self._match: dict[str, bool] = {}
        self.pending: collections.deque[TailBatch] = collections.deque()

    def take(self, n: int) -> TailBatch | None:
        """Up to n events (a batch of them), None if none is stored yet."""
        if not self.pending:
            self._fill()
        return take_from(self.pending, n)

    def _fill(self) -> None:
        fill(self.tail, self.glob, self._match, self.pending)

    def position(self) -> int:
        """The offset after everything read so far (END frames)."""
        return self.tail.end_offset()

    def at_end(self) -> bool:
        return not self.pending

    def commit(self, member, count: int) -> int:
        raise GroupError("COMMIT is not allowed without a group; allowed: SUBSCRIBE with a group name first")

    def leave(self, member) -> None:
        self.tail.close()


class Group:
    """One consumer group's shared cursor (see the module doc). Thread-safe. Events are held in
    batches (storage.tail.TailBatch): handed out, committed and handed back a batch (or a slice of
    one) at a time, never one Python object per event."""

    def __init__(self, name: str, glob: str, tail: LogTail, store: GroupStore, committed: int | None):
        self.name = name
        self.glob = glob
        self.tail = tail
        self.store = store
        self.committed = committed
        self.lock = threading.Lock()
        self.queue: collections.deque[TailBatch] = collections.deque()  # read, not handed out (redeliveries first)
        self.inflight: dict[object, collections.deque[TailBatch]] = {}  # per member, in sending order
        self.done: dict[object, int] = {}  # per member: events committed (the count COMMIT carries)
        self.wakers: dict[object, threading.Event] = {}
        self._match: dict[str, bool] = {}

    def take(self, member, n: int) -> TailBatch | None:
        with self.lock:
            if not self.queue:
                fill(self.tail, self.glob, self._match, self.queue)
            out = take_from(self.queue, n)
            if out is not None:
                self.inflight.setdefault(member, collections.deque()).append(out)
            return out

    def _low_locked(self) -> int:
        low = self.tail.next_offset
        for q in (self.queue, *self.inflight.values()):
            got = lowest_offset(q)
            if got is not None:
                low = min(low, got)
        return low

    def commit(self, member, count: int) -> int:
        """Member `member` is done with the first `count` events sent to it; returns the group's durable
        committed offset."""
        with self.lock:
            mine = self.inflight.setdefault(member, collections.deque())
            done = self.done.get(member, 0)
            held = sum(len(b) for b in mine)
            if not done <= count <= done + held:
                raise GroupError(
                    f"COMMIT {count} is not allowed; allowed: {done}..{done + held} (the number "
                    "of events sent to this connection that are done, cumulative)"
                )
            k = count - done
            while k:  # whole batches, then a slice of one
                b = mine[0]
                if len(b) <= k:
                    mine.popleft()
                    k -= len(b)
                else:
                    mine[0] = b[k:]
                    k = 0
            self.done[member] = count
            low = self._low_locked()
            if self.committed is None or low > self.committed:
                self.store.save(self.name, low)  # under the lock: saves are ordered, never go backwards
                self.committed = low
            return self.committed

    def leave(self, member) -> bool:
        """Hand the member's in-flight events back; True when the group has no member left."""
        with self.lock:
            back = sorted(self.inflight.pop(member, ()), key=lambda b: int(b.rows["offset"].min()))
            self.done.pop(member, None)
            self.wakers.pop(member, None)
            if back:
                self.queue.extendleft(reversed(back))
            wakers = list(self.wakers.values())
            empty = not self.inflight
        for w in wakers:
            w.set()  # the others may take what came back
        return empty

    def position(self) -> int:
        with self.lock:
            return self.tail.end_offset()

    def at_end(self) -> bool:
        with self.lock:
            return not self.queue


class GroupSource:
    """A member's view of its group (what a session calls)."""

    def __init__(self, registry: GroupRegistry, group: Group, member):
        self.registry = registry
        self.g = group
        self.member = member
        self.group = group.name

    def take(self, n: int) -> TailBatch | None:
        return self.g.take(self.member, n)

    def position(self) -> int:
        return self.g.position()

    def at_end(self) -> bool:
        return self.g.at_end()

    def commit(self, member, count: int) -> int:
        return self.g.commit(self.member, count)

    def leave(self, member) -> None:
        self.registry.leave(self.g, self.member)


class GroupRegistry:
    """The live groups of a subscribe server; committed offsets in `store`."""

    def __init__(self, store: GroupStore, log_path: Path, dtype, index: SegmentIndex):
        self.store = store
        self.log_path = log_path
        self.dtype = dtype
        self.index = index
        self.lock = threading.Lock()
        self.groups: dict[str, Group] = {}

    def join(self, sub: sp.Subscribe, member, waker: threading.Event) -> GroupSource:
        with self.lock:
            g = self.groups.get(sub.group)
            if g is None:
                committed = self.store.load(sub.group)
                tail = open_tail(self.log_path, self.dtype, self.index, sub, resume=committed)
                g = self.groups[sub.group] = Group(sub.group, sub.glob, tail, self.store, committed)
            elif g.glob != sub.glob:
                raise GroupError(
                    f"group {sub.group!r} follows topic glob {g.glob!r}; a member subscribing to "
                    f"{sub.glob!r} is not allowed (allowed: the same glob, or another group name)"
                )
            with g.lock:
                g.inflight.setdefault(member, collections.deque())
                g.wakers[member] = waker
            return GroupSource(self, g, member)

    def leave(self, g: Group, member) -> None:
        with self.lock:
            if g.leave(member) and self.groups.get(g.name) is g:
                del self.groups[g.name]
                g.tail.close()
