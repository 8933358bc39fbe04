"""Snapshots: a flow's keyed state and its input position, on disk together, replaced atomically.

One file per flow, `<data_dir>/flows/<flow>.snapshot`: a small header line (JSON: flow, offset,
partitions, taken_ns) then the pickled state of every stateful operator of every partition. Written
to a temporary file, fsynced, renamed over the old one, and the directory fsynced: after kill -9 the
file is the old snapshot or the new one, whole, never a mix.

A snapshot is taken only between steps (every partition idle at the barrier) and only once every
output of the steps before it is stored by the engine, so "state as of offset N" and "outputs of
events before N" always go together. After a restart the flow restores it and reads the log from N:
the outputs it makes again carry the same event ids and the engine stores them once.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

MAGIC = b"ESFLOWSNAP1\n"


class SnapshotError(ValueError):
    """A snapshot file cannot be used; the message says which and what to do."""


def snapshot_path(directory: Path, flow: str) -> Path:
    return Path(directory) / f"{flow}.snapshot"


def write(path: Path, offset: int, state: dict) -> int:
    """Write a snapshot (atomic replace + fsync); returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        json.dumps(
            {
                "flow": state.get("flow"),
                "offset": int(offset),
                "partitions": state.get("partitions"),
                "taken_ns": time.time_ns(),
            }
        ).encode()
        + b"\n"
    )
    body = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(MAGIC + head + body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return len(MAGIC) + len(head) + len(body)


def read_header(path: Path) -> dict | None:
    """The header of a snapshot (no state loaded), or None if there is none."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise SnapshotError(
                    f"{path}: not a flow snapshot; allowed: a file eventstream wrote (delete it "
                    "to start the flow from the beginning of the log)"
                )
            return json.loads(f.readline())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SnapshotError(
            f"{path}: unreadable flow snapshot ({exc}); allowed: a file eventstream wrote "
            "(delete it to start the flow from the beginning of the log)"
        ) from None


def read(path: Path) -> tuple[int, dict] | None:
    """(input offset, state) of the snapshot at `path`, or None if there is none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(MAGIC):
        raise SnapshotError(
            f"{path}: not a flow snapshot; allowed: a file eventstream wrote (delete it to "
            "start the flow from the beginning of the log)"
        )
    nl = data.index(b"\n", len(MAGIC))
    try:
        head = json.loads(data[len(MAGIC) : nl])
        state = pickle.loads(data[nl + 1 :])
    except Exception as exc:  # noqa: BLE001 - any unpickling error means the same thing here
        raise SnapshotError(
            f"{path}: unreadable flow snapshot ({type(exc).__name__}: {exc}); allowed: a file "
            "eventstream wrote (delete it to start the flow from the beginning of the log)"
        ) from None
    return int(head["offset"]), state
