"""Segments of a log file: the one rule for naming, rotating and retiring them, shared by the event
log (storage/writer.py: events.bin) and the dead-letter log (engine/dlq.py: dlq_log.txt).

A log at `path` appends to `path` itself, the active file. Rotation renames the active file to the
closed segment `<name>.<n>` (n one more than the highest closed segment unless the writer says) and
the writer opens a new active file. Retention retires the oldest closed segments beyond a count and
any closed segment older than an age (its mtime: when it was last written). Readers read the closed
segments oldest first, then the active file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["expired", "next_segment", "rotate", "segment_paths"]


def segment_paths(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """The closed segments `<name>.<n>` of the log at `path`, oldest (smallest n) first."""
    path = Path(path)
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(
        (int(nm[len(prefix) :]), path.parent / nm)
        for nm in names
        if nm.startswith(prefix) and nm[len(prefix) :].isdigit()
    )


def next_segment(path: str | os.PathLike) -> int:
    """The number the next closed segment of the log at `path` gets: one more than the highest."""
    return max((n for n, _ in segment_paths(path)), default=0) + 1


def rotate(path: Path, n: int | None = None) -> Path:
    """Close the active file of the log at `path` as segment `n` (default: next_segment) by renaming
    it; the caller then opens a new active file. Returns the segment's path; raises OSError."""
    target = path.with_name(f"{path.name}.{next_segment(path) if n is None else n}")
    os.rename(path, target)
    return target


def expired(path: str | os.PathLike, keep: int | None, max_age_s: float) -> list[tuple[int, Path]]:
    """The closed segments retention retires, oldest first: all but the newest `keep` (None: no
    count bound), then those left whose mtime is more than `max_age_s` ago (0: no age bound)."""
    segs = segment_paths(path)
    doomed = segs[: max(0, len(segs) - keep)] if keep is not None else []
    if max_age_s > 0:
        cutoff = time.time() - max_age_s
        for s in segs[len(doomed) :]:
            try:
                if os.stat(s[1]).st_mtime < cutoff:
                    doomed.append(s)
            except FileNotFoundError:
                pass
    return doomed
