"""runtime/heap.py: once the thresholds are set, a large block freed by one batch is reused by the
next (no fresh pages, no page faults per batch)."""

from __future__ import annotations

import resource
import subprocess
import sys
import threading

import numpy as np
import pytest

from eventstream.runtime import heap


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_page_faults():
    if not heap.keep_freed_memory():
        pytest.skip("not glibc, or MALLOC_*_THRESHOLD_ set in the environment")
    got: list[int] = []

    def batches() -> None:  # on a thread of its own, like a reader (its own malloc arena)
        for _ in range(3):  # warm: the heap grows once
            blocks = [np.ones(1 << 20, dtype=np.uint8) for _ in range(3)]
            del blocks
        before = faults()
        for _ in range(50):  # three 1 MiB arrays alive at once, then freed: a batch's temporaries
            blocks = [np.ones(1 << 20, dtype=np.uint8) for _ in range(3)]
            del blocks
        got.append(faults() - before)

    t = threading.Thread(target=batches)
    t.start()
    t.join()
    # glibc's defaults trim the 3 MiB freed top back to the kernel every round: ~38,000 faults here
    assert got[0] < 768, f"{got[0]} page faults for 50 rounds: freed memory was not reused"
    assert heap.keep_freed_memory()  # once per process: asking again answers the same


def test_the_operators_malloc_settings_are_left_alone():
    code = "from eventstream.runtime import heap; print(heap.keep_freed_memory())"
    env = {"MALLOC_TRIM_THRESHOLD_": "131072", "PYTHON_GIL": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
