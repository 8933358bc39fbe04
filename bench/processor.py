"""The transactional processor's CPU per event, stage by stage, on one thread (no engine threads).

A real Engine is opened (events.bin in a temp directory, fsync none, ACK `stored`, the default
records.payload_bytes) but its processors are not started: this thread decodes BATCH frames of
--batch 64-byte events on one topic (MEDIUM: the transactional tier, as bench/peers.py sends them),
offers the records to the bus (stamp, route, ring copy), and then runs the transactional
processor's own loop step (`_drain_once`: poll, dedup, store, commit, release, `stored` advance,
metrics) on the same thread. --frames-per-poll frames are offered before each poll (the processor
of a busy engine finds several frames queued).

Every stage is timed with time.thread_time_ns (CPU of this thread only, so the other processes on
a shared machine matter less than for wall-clock figures). `--profile` runs the processor's step
under cProfile instead (one thread: cProfile is of no use with the engine's threads on 3.13t).

    python bench/processor.py [--events N] [--batch N] [--frames-per-poll K] [--repeats R] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from harness import format_facts, format_table, machine_facts  # noqa: E402

from eventstream.config.loader import load_config  # noqa: E402
from eventstream.engine.engine import Engine  # noqa: E402
from eventstream.engine.manager import ProcessManager  # noqa: E402
from eventstream.engine.processors import Sinks  # noqa: E402
from eventstream.metrics.registry import MetricsRegistry  # noqa: E402
from eventstream.protocol.decoder import FrameDecoder  # noqa: E402
from eventstream.protocol.frames import encode_batch_columns  # noqa: E402

TOPIC = "bench.t"
STAGES = ("decode", "offer", "drain")
# parts of "drain", timed by wrapping what the processor calls (a few calls per batch)
PARTS = ("dedup_probe", "store", "dedup_commit", "release", "metrics")


def frames(n_frames: int, batch: int, size: int, first_id: int) -> list[bytes]:
    """BATCH frames of `batch` events of `size` bytes, one topic, MEDIUM, ids counting from first_id."""
    payloads = (bytes(range(256)) * (batch * size // 256 + 1))[: batch * size]
    out = []
    for k in range(n_frames):
        ids = np.arange(first_id + k * batch, first_id + (k + 1) * batch, dtype=np.uint64)
        out.append(encode_batch_columns([TOPIC], np.zeros(batch, dtype=np.int64), np.full(batch, size), payloads, 2,
                                        event_ids=ids))
    return out


class Rig:
    """An opened Engine with its transactional processor made but not started."""

    def __init__(self, tmp: str):
        cfg = load_config(environ={}, overrides={"storage.data_dir": str(Path(tmp) / "data"), "storage.fsync": "none",
                                                 "server.ack": "stored", "logging.level": "warning"})
        self.engine = engine = Engine(cfg, MetricsRegistry()).open()
        sinks = Sinks(engine.topics, store=engine._store, drop=engine.drop, processed=engine._processed,
                      dedup_hit=engine.metrics.dedup_hits, sync=engine._sync, progress=engine.stored.advance,
                      stages=engine._stages)
        self.manager = ProcessManager(cfg, engine.bus, sinks)
        self.proc = self.manager._make("transactional", worker=0)
        self.dec = FrameDecoder(engine.topics, payload_bytes=cfg.records.payload_bytes, ack_default=2)
        self.part = None
        self.parts = dict.fromkeys(PARTS, 0)
        proc, eng = self.proc, self.engine
        proc.skip_duplicates = self._timed("dedup_probe", proc.skip_duplicates)
        proc.commit_ids = self._timed("dedup_commit", proc.commit_ids)
        sinks.store = self._timed("store", sinks.store)
        sinks.progress = self._timed("release", sinks.progress)
        sinks.stages = self._timed("metrics", sinks.stages)
        proc.processed = self._timed("metrics", proc.processed)
        proc._flush_metrics = self._timed("metrics", proc._flush_metrics)
        base = sys.modules[type(proc).__mro__[1].__module__]
        base.release_records = self._timed("release", base.release_records)
        del eng

    def _timed(self, part: str, fn):
        clock, parts = time.thread_time_ns, self.parts

        def timed(*args, **kw):
            t0 = clock()
            try:
                return fn(*args, **kw)
            finally:
                parts[part] += clock() - t0

        return timed

    def decode(self, frame: bytes) -> np.ndarray:
        recs, errors = self.dec.feed(frame)
        assert not errors, errors
        return recs

    def offer(self, recs: np.ndarray) -> None:
        off = self.engine.offer(recs)
        assert off.held is None and not off.refused, "the ring is full: lower --frames-per-poll"
        if self.part is None:
            ring = off.marks[0][0]
            self.part = self.engine.bus["transactional"].partition_of[id(ring)]

    def drain(self) -> int:
        n = 0
        while self.proc._drain_once(self.part):
            n += 1
        return n

    def prefill(self, n: int, first_id: int) -> None:
        """Commit `n` ids (below first_id) of the topic to the partition's dedup table first: a
        server that has stored events for a while probes a table of that many keys."""
        if n <= 0:
            return
        tid = self.engine.topics.intern(TOPIC)
        part = tid % self.engine.bus["transactional"].partitions
        table = self.proc.dedups[part]
        for a in range(0, n, 1 << 20):
            ids = np.arange(first_id - n + a, first_id - n + min(n, a + (1 << 20)), dtype=np.uint64)
            table.commit(ids, np.full(len(ids), tid, dtype=np.uint64))

    def close(self) -> None:
        self.engine.close()
        for tables in (self.manager.dedups or {}).values():
            for t in tables:
                t.close()


def run(events: int, batch: int, per_poll: int, first_id: int, prefill: int, profile: cProfile.Profile | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="es-proc-bench-") as tmp:
        rig = Rig(tmp)
        try:
            rig.prefill(prefill, first_id)
            n_frames = events // batch
            fr = frames(n_frames, batch, 64, first_id)
            cpu = dict.fromkeys(STAGES, 0)
            polls = 0
            clock = time.thread_time_ns
            for k in range(0, n_frames, per_poll):
                for f in fr[k : k + per_poll]:
                    t0 = clock()
                    recs = rig.decode(f)
                    t1 = clock()
                    rig.offer(recs)
                    t2 = clock()
                    cpu["decode"] += t1 - t0
                    cpu["offer"] += t2 - t1
                t0 = clock()
                if profile is not None:
                    profile.enable()
                polls += rig.drain()
                if profile is not None:
                    profile.disable()
                cpu["drain"] += clock() - t0
            t0 = clock()
            rig.proc._flush_metrics()  # what a worker records before it parks (metrics left pending)
            cpu["drain"] += clock() - t0
            stored = rig.engine.event_log.statistics()["records"]
            assert stored == n_frames * batch, (stored, n_frames * batch)
            size = rig.engine.event_log.path.stat().st_size
            load = rig.proc.dedups[rig.part].statistics()["load"] if rig.proc.dedups else 0.0
        finally:
            rig.close()
    n = n_frames * batch
    parts = dict(rig.parts, other=cpu["drain"] - sum(rig.parts.values()))
    return {"events": n, "polls": polls, "log_bytes_per_event": round(size / n, 1), "dedup_load": round(load, 2),
            **{f"{s}_ns": cpu[s] / n for s in STAGES}, **{f"{s}_ns": v / n for s, v in parts.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000, help="events per BATCH frame (default 1000)")
    p.add_argument("--frames-per-poll", type=int, default=4, help="frames offered before each processor step")
    p.add_argument("--prefill", type=int, default=1_000_000,
                   help="ids in the dedup table before the run (default 1000000; 0: an empty table that grows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the processor's steps (top 30 by tottime)")
    a = p.parse_args(argv)
    prof = cProfile.Profile() if a.profile else None
    first = a.prefill + 1
    run(min(a.events, 20 * a.batch), a.batch, a.frames_per_poll, first, 0, None)  # warm-up
    runs = [run(a.events, a.batch, a.frames_per_poll, first, a.prefill, prof) for _ in range(a.repeats)]
    row = {"batch": a.batch, "frames_per_poll": a.frames_per_poll, "events": a.events,
           "polls": runs[0]["polls"], "log_bytes_per_event": runs[0]["log_bytes_per_event"],
           "dedup_load": runs[0]["dedup_load"]}
    for s in STAGES:
        row[f"{s}_ns"] = round(min(r[f"{s}_ns"] for r in runs))
    row["total_ns"] = sum(row[f"{s}_ns"] for s in STAGES)
    for s in (*PARTS, "other"):
        row[f"{s}_ns"] = round(min(r[f"{s}_ns"] for r in runs))
    facts = machine_facts()
    if a.json:
        print(json.dumps({"facts": facts, "rows": [row]}))
    else:
        print(format_facts(facts))
        print(format_table([row], list(row)))
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
