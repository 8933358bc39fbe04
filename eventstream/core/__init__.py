"""Core primitives: NUMA arena, atomic cells, records, rings, pool, dedup. No sockets, no engine."""
