"""NUMA topology: nodes, their CPUs and distances (libnuma when present, sysfs otherwise).

`simulate(n)` splits the allowed CPUs into `n` pretend nodes, so per-node code paths run on a
one-node machine; every Topology says whether it is simulated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]
    memory_bytes: int = 0


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    distances: dict[tuple[int, int], int] = field(default_factory=dict)
    simulated: bool = False
    source: str = "sysfs"

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"NUMA node {node_id} does not exist; nodes: {[n.id for n in self.nodes]}")

    def node_of_cpu(self, cpu: int) -> int:
        for n in self.nodes:
            if cpu in n.cpus:
                return n.id
        return self.nodes[0].id


def _parse_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _from_libnuma() -> Topology | None:
    try:
        from eventstream.core import numa
    except Exception:  # noqa: BLE001  # pragma: no cover - libnuma missing: detect() reads sysfs instead
        return None
    lib = numa.library()
    if lib is None or not numa.available():
        return None
    allowed = os.sched_getaffinity(0)
    nodes = []
    for nid in range(numa.max_node() + 1):
        cpus = tuple(c for c in numa.node_cpus(nid) if c in allowed)
        if not cpus and not numa.node_size(nid):
            continue
        nodes.append(Node(nid, cpus, numa.node_size(nid)))
    if not nodes:
        return None
    dist = {(a.id, b.id): numa.distance(a.id, b.id) for a in nodes for b in nodes}
    return Topology(tuple(nodes), dist, False, "libnuma")


def _from_sysfs() -> Topology:
    allowed = os.sched_getaffinity(0)
    base = Path("/sys/devices/system/node")
    nodes = []
    dist: dict[tuple[int, int], int] = {}
    if base.exists():
        for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
            nid = int(d.name[4:])
            try:
                cpus = tuple(c for c in _parse_list((d / "cpulist").read_text()) if c in allowed)
            except OSError:
                continue
            nodes.append(Node(nid, cpus))
            try:
                row = [int(x) for x in (d / "distance").read_text().split()]
                for j, v in enumerate(row):
                    dist[(nid, j)] = v
            except OSError:
                pass
    if not nodes:
        nodes = [Node(0, tuple(sorted(allowed)))]
        dist = {(0, 0): 10}
    return Topology(tuple(nodes), dist, False, "sysfs")


def detect() -> Topology:
    return _from_libnuma() or _from_sysfs()


def simulate(n_nodes: int, cpus: list[int] | None = None) -> Topology:
    """Split `cpus` (default: allowed CPUs) into `n_nodes` pretend nodes of near-equal size."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if n_nodes < 1 or n_nodes > len(cpus):
        raise ValueError(f"cannot simulate {n_nodes} nodes on {len(cpus)} CPUs; allowed: 1..{len(cpus)}")
    per, extra = divmod(len(cpus), n_nodes)
    nodes, i = [], 0
    for nid in range(n_nodes):
        k = per + (1 if nid < extra else 0)
        nodes.append(Node(nid, tuple(cpus[i : i + k])))
        i += k
    dist = {(a, b): 10 if a == b else 20 for a in range(n_nodes) for b in range(n_nodes)}
    return Topology(tuple(nodes), dist, True, "simulated")
