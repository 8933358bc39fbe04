"""OS scheduling per thread role (Linux): which policy and priority a thread asks the kernel for.

On a CPU that bulk work shares with the latency path (the ingest readers run the realtime lane), the
order in which the kernel runs runnable threads decides the realtime tail: a reader woken by new bytes
waits for a bulk worker's time slice unless the worker is scheduled below it. A policy is one string
per role (config key `scheduling.<role>`):

    normal        SCHED_OTHER, the nice value left as it is (the default of the latency roles)
    normal:N      SCHED_OTHER at nice N (-20..19; below 0 needs CAP_SYS_NICE or RLIMIT_NICE)
    batch         SCHED_BATCH: never preempts a running thread when it wakes (nice left as it is)
    batch:N       SCHED_BATCH at nice N (0..19): the default of the bulk tiers' workers, `batch:10`
    idle          SCHED_IDLE: runs only when nothing else on its CPU wants to
    fifo:P, rr:P  SCHED_FIFO / SCHED_RR at priority P (1..99): above every normal thread (needs
                  CAP_SYS_NICE or RLIMIT_RTPRIO; the kernel's RT throttling still leaves others 5 %)

Lowering a thread (a higher nice, batch, idle) needs no privilege. A policy the OS refuses is logged
(`scheduling_refused`, with the role, the policy and the error) and the thread runs on unchanged: a
start is never refused for it. `parse` is what the configuration validates with.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import structlog

log = structlog.get_logger("eventstream.scheduling")

ALLOWED = (
    "'normal', 'normal:N' (nice N in -20..19), 'batch', 'batch:N' (nice N in 0..19), 'idle', "
    "'fifo:P' or 'rr:P' (priority P in 1..99)"
)
_KINDS = ("normal", "batch", "idle", "fifo", "rr")


@dataclass(frozen=True)
class Policy:
    kind: str = "normal"  # one of _KINDS
    nice: int | None = None  # normal and batch: the nice value to set (None: leave it)
    priority: int = 0  # fifo and rr: 1..99

    def __str__(self) -> str:
        if self.kind in ("fifo", "rr"):
            return f"{self.kind}:{self.priority}"
        return self.kind if self.nice is None else f"{self.kind}:{self.nice}"

    @property
    def is_default(self) -> bool:
        """Nothing to ask the kernel for: the thread keeps what it inherited."""
        return self.kind == "normal" and self.nice is None


def parse(text: str) -> Policy:
    """A Policy from its config text; ValueError saying what is allowed otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"scheduling policy {text!r} is not allowed; allowed: {ALLOWED}")
    kind, sep, arg = text.strip().lower().partition(":")
    bad = ValueError(f"scheduling policy {text!r} is not allowed; allowed: {ALLOWED}")
    if kind not in _KINDS or (sep and not arg):
        raise bad
    if kind == "idle":
        if sep:
            raise bad
        return Policy("idle")
    if kind in ("fifo", "rr"):
        if not sep:
            raise bad
        try:
            prio = int(arg)
        except ValueError:
            raise bad from None
        if not 1 <= prio <= 99:
            raise bad
        return Policy(kind, None, prio)
    if not sep:
        return Policy(kind)
    try:
        nice = int(arg)
    except ValueError:
        raise bad from None
    if not (-20 if kind == "normal" else 0) <= nice <= 19:
        raise bad
    return Policy(kind, nice)


def _os_policy(kind: str) -> int:
    return {
        "normal": os.SCHED_OTHER,
        "batch": os.SCHED_BATCH,
        "idle": os.SCHED_IDLE,
        "fifo": os.SCHED_FIFO,
        "rr": os.SCHED_RR,
    }[kind]


def apply_current_thread(policy: Policy | str | None, role: str | None = None) -> bool:
    """Ask the kernel to schedule the calling thread by `policy` (Linux: both calls act on one thread).
    True when it is in effect (or there was nothing to do); False when the OS refused (logged; the
    thread runs on as it was)."""
    if policy is None:
        return True
    if isinstance(policy, str):
        policy = parse(policy)
    if policy.is_default:
        return True
    role = role or threading.current_thread().name
    try:
        os.sched_setscheduler(0, _os_policy(policy.kind), os.sched_param(policy.priority))
        if policy.nice is not None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), policy.nice)
    except (OSError, AttributeError) as exc:
        log.warning(
            "scheduling_refused",
            role=role,
            policy=str(policy),
            error=str(exc),
            hint="raising a thread (fifo, rr, a negative nice) needs CAP_SYS_NICE or RLIMIT_RTPRIO/RLIMIT_NICE",
        )
        return False
    log.debug("scheduled", role=role, policy=str(policy), native_id=threading.get_native_id())
    return True


def current_thread_policy() -> tuple[int, int, int]:
    """(OS policy, its priority, nice) of the calling thread: what a test or an operator checks."""
    tid = threading.get_native_id()
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority, os.getpriority(os.PRIO_PROCESS, tid)
