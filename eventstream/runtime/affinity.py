"""Pin the calling thread to CPUs, from inside the thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import structlog

log = structlog.get_logger("eventstream.affinity")


class AffinityError(ValueError):
    pass


def allowed_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def validate_cpus(cpus: Iterable[int], role: str = "thread") -> list[int]:
    """Check `cpus` against the CPUs this process may use; raise AffinityError naming the bad ones."""
    cpus = sorted(set(int(c) for c in cpus))
    have = allowed_cpus()
    bad = [c for c in cpus if c not in have]
    if bad:
        raise AffinityError(f"{role}: CPUs {bad} are not available; allowed: {sorted(have)}")
    return cpus


def pin_current_thread(cpus: Iterable[int] | None, role: str | None = None, *, strict: bool = False) -> list[int]:
    """Pin the calling thread to `cpus` (empty/None: leave it unpinned). Returns the CPUs now in effect.

    Invalid CPUs raise AffinityError when `strict`, else log a warning and fall back to the CPUs that
    are valid (or to no pinning). A refused sched_setaffinity (EPERM, containers) degrades with a
    warning: the thread keeps running unpinned.
    """
    role = role or threading.current_thread().name
    if not cpus:
        return sorted(allowed_cpus())
    wanted = sorted(set(int(c) for c in cpus))
    have = allowed_cpus()
    bad = [c for c in wanted if c not in have]
    if bad:
        if strict:
            raise AffinityError(f"{role}: CPUs {bad} are not available; allowed: {sorted(have)}")
        log.warning("cpus_unavailable", role=role, wanted=wanted, unavailable=bad, allowed=sorted(have))
        wanted = [c for c in wanted if c in have]
        if not wanted:
            return sorted(have)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        log.warning("pin_refused", role=role, cpus=wanted, error=str(exc))
        return sorted(os.sched_getaffinity(0))
    log.debug("pinned", role=role, cpus=wanted, native_id=threading.get_native_id())
    return wanted
