"""Executor: runs a flow's graph over batches, split into stages at every key_by, on P partitions.

    stage 0      partition p takes the p-th contiguous slice of the input batch and runs the operators
                 up to each key_by (decode, map, filter, the key function...)
    exchange     each partition splits its keyed output by partition_of(key) (ids.py) into P parts
    stage 1..    partition p concatenates the parts sent to it in partition order (slices are
                 contiguous, so that is source-log order) and runs the keyed operators it owns

Each stage runs on all partitions at once (the runtime gives every partition a thread and a barrier
between stages; eventstream.testing runs them one after another: same results). Because a partition
sees its keys' events in log order whatever the batch boundaries, windows, watermarks and lateness
come out the same when the log is replayed from a snapshot.

Unkeyed streams that cross a stage (merged with a keyed one later) stay in their partition.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from eventstream.flow import ids
from eventstream.flow.batch import Batch
from eventstream.flow.flow import Flow, Node
from eventstream.flow.operators import OPS, Context, Op


def assign_stages(flow: Flow) -> list[list[Node]]:
    """Each node's stage (nodes are created after their parents: creation order is topological)."""
    for n in flow.nodes:
        n.stage = max((p.stage + (1 if p.kind == "key_by" else 0) for p in n.parents), default=0)
    stages: list[list[Node]] = [[] for _ in range(max(n.stage for n in flow.nodes) + 1)]
    for n in flow.nodes:
        stages[n.stage].append(n)
    return stages


class Executor:
    def __init__(self, flow: Flow, partitions: int = 1, *, clock: Callable[[], int] = time.time_ns):
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"flow {flow.name!r}: parallelism={partitions!r} is not allowed; allowed: an integer >= 1")
        self.flow = flow
        self.partitions = partitions
        self.stages = assign_stages(flow)
        self.children: dict[int, list[tuple[Node, int]]] = {n.id: [] for n in flow.nodes}
        for n in flow.nodes:
            for i, p in enumerate(n.parents):
                self.children[p.id].append((n, i))
        self.ops: list[dict[int, Op]] = [
            {n.id: OPS[n.kind](n, flow.name) for n in flow.nodes} for _ in range(partitions)
        ]
        self.ctx = [Context(flow.name, p, clock, ids.KeyHasher()) for p in range(partitions)]
        # exchange[(child id, parent index)][src][dst]: batches crossing a stage boundary
        self.exchange: dict[tuple[int, int], list[list[Batch | None]]] = {}
        for n in flow.nodes:
            for i, p in enumerate(n.parents):
                if n.stage > p.stage:
                    self.exchange[(n.id, i)] = [[None] * partitions for _ in range(partitions)]
        self.source_in: list[Batch] = [Batch.empty()] * partitions

    # ------------------------------------------------------------------ input
    def load(self, batch: Batch) -> None:
        """The next input batch (payloads as values), cut into one contiguous slice per partition."""
        P = self.partitions
        n = len(batch)
        if P == 1:
            self.source_in = [batch]
            return
        bounds = [n * p // P for p in range(P + 1)]
        self.source_in = [_slice(batch, bounds[p], bounds[p + 1]) for p in range(P)]

    def set_final(self, final: bool) -> None:
        for c in self.ctx:
            c.final = final

    # ------------------------------------------------------------------ running
    def run_stage(self, stage: int, p: int) -> None:
        """Run one stage's operators for partition p (the runtime calls this on p's thread)."""
        ctx = self.ctx[p]
        ops = self.ops[p]
        outs: dict[int, Batch | tuple[Batch, Batch]] = {}
        for node in self.stages[stage]:
            if node.kind == "source":
                inputs = [self.source_in[p]]
                self.source_in[p] = Batch.empty()
            else:
                inputs = []
                for i, par in enumerate(node.parents):
                    if node.stage > par.stage:
                        cell = self.exchange[(node.id, i)]
                        parts = [cell[src][p] for src in range(self.partitions)]
                        for src in range(self.partitions):
                            cell[src][p] = None
                        inputs.append(Batch.concat([b for b in parts if b is not None]))
                    else:
                        out = outs[par.id]
                        if isinstance(out, tuple):  # branch: (true, false)
                            out = out[node.params["which"]]
                        inputs.append(out)
            out = ops[node.id].run(inputs, ctx)
            outs[node.id] = out
            for child, i in self.children[node.id]:
                if child.stage > node.stage:
                    self._send(out, (child.id, i), p, ctx)

    def _send(self, batch: Batch, edge: tuple[int, int], src: int, ctx: Context) -> None:
        cell = self.exchange[edge]
        P = self.partitions
        if P == 1 or batch.keys is None or not len(batch):
            cell[src][src] = batch
            return
        dest = ids.partition_of(ctx.hasher.hashes(batch.keys), P)
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=P)
        pos = 0
        for dst in range(P):
            k = int(counts[dst])
            cell[src][dst] = batch.take(order[pos : pos + k]) if k else None
            pos += k

    def run_serial(self) -> None:
        """Every stage for every partition, one after another (eventstream.testing)."""
        for s in range(len(self.stages)):
            for p in range(self.partitions):
                self.run_stage(s, p)

    def collect(self) -> tuple[list, list]:
        """What every partition emitted ((target, batch), in partition order) and dead-lettered."""
        emitted, dead = [], []
        for c in self.ctx:
            e, d = c.take_outputs()
            emitted += e
            dead += d
        return emitted, dead

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict:
        """The state of every stateful operator of every partition (call between steps only)."""
        return {
            "flow": self.flow.name,
            "partitions": self.partitions,
            "ops": {
                n.name: [self.ops[p][n.id].snapshot() for p in range(self.partitions)]
                for n in self.flow.nodes
                if self.ops[0][n.id].stateful
            },
        }

    def restore(self, snap: dict) -> None:
        if snap.get("partitions") != self.partitions:
            raise ValueError(
                f"flow {self.flow.name!r}: the snapshot was taken with parallelism "
                f"{snap.get('partitions')}, this run has {self.partitions}; allowed: the same "
                "parallelism (or delete the flow's snapshot to start it over)"
            )
        for n in self.flow.nodes:
            op0 = self.ops[0][n.id]
            if op0.stateful and n.name in snap["ops"]:
                for p in range(self.partitions):
                    self.ops[p][n.id].restore(snap["ops"][n.name][p])
                    bind = getattr(self.ops[p][n.id], "bind", None)
                    if bind is not None:
                        bind(self.ctx[p].hasher)

    def operators(self) -> list[dict]:
        """Per operator, summed over partitions: in, out, late, errors, state keys, watermark."""
        out = []
        for n in self.flow.nodes:
            ops = [self.ops[p][n.id] for p in range(self.partitions)]
            wms = [w for w in (o.watermark() for o in ops) if w is not None]
            out.append(
                {
                    "operator": n.name,
                    "kind": n.kind,
                    "in": sum(o.n_in for o in ops),
                    "out": sum(o.n_out for o in ops),
                    "late": sum(o.n_late for o in ops),
                    "errors": sum(o.n_errors for o in ops),
                    "state_keys": sum(o.state_keys() for o in ops),
                    "watermark": min(wms) if wms else None,
                }
            )
        return out


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    v = batch.values
    return Batch(
        v[lo:hi],
        batch.ts[lo:hi],
        batch.seq[lo:hi],
        batch.origin[lo:hi],
        None if batch.keys is None else batch.keys[lo:hi],
        batch.topic[lo:hi],
    )
