"""Process runtime: GIL guard, CPU pinning, NUMA topology."""
