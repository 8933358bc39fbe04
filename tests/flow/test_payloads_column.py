"""flow.batch.Payloads: the payloads of a batch read from the log as one column over the bytes read;
what a serde decodes from it equals what it decodes from the same payloads as a list."""

from __future__ import annotations

import numpy as np

from eventstream.flow.batch import Batch, Payloads, concat_column
from eventstream.flow.serde import Dtype, Json

LAYOUT = np.dtype([("key", "<u4"), ("n", "<i4")])


def column(payloads: list[bytes], gaps: bool) -> Payloads:
    data, starts = b"", []
    for p in payloads:
        if gaps:
            data += b"\xee" * 3  # other entries' bytes between the payloads (a v1 log, a skipped topic)
        starts.append(len(data))
        data += p
    return Payloads(data, np.array(starts, dtype=np.int64), np.array([len(p) for p in payloads], dtype=np.int64))


def test_indexing_slicing_take_and_join_are_the_payloads():
    pays = [b"a", b"", b"ccc", b"dd", b"eeee"]
    for gaps in (False, True):
        col = column(pays, gaps)
        assert len(col) == 5 and col.tolist() == pays and list(col) == pays
        assert col[2] == b"ccc" and col[1:4].tolist() == pays[1:4]
        assert col.take(np.array([4, 0])).tolist() == [b"eeee", b"a"]
        assert col.joined() == b"".join(pays) and col[3:].joined() == b"ddeeee"
        assert col[:0].joined() == b""
        b = Batch(col, np.zeros(5, np.int64), np.arange(5), np.arange(5, dtype=np.uint64))
        assert b.take(np.array([True, False, True, False, False])).values.tolist() == [b"a", b"ccc"]
        assert concat_column([col[:2], col[2:]]) == pays


def test_dtype_decodes_the_column_as_it_decodes_the_list():
    rows = np.zeros(4, dtype=LAYOUT)
    rows["key"] = [1, 2, 3, 4]
    rows["n"] = [-1, 5, 7, 9]
    pays = [r.tobytes() for r in rows]
    serde = Dtype(LAYOUT)
    for gaps in (False, True):
        got, bad = serde.decode(column(pays, gaps))
        assert bad == [] and got.tolist() == rows.tolist()
    pays[2] = b"short"
    want, want_bad = serde.decode(pays)
    got, bad = serde.decode(column(pays, True))
    assert bad == want_bad and [i for i, _ in bad] == [2] and got.tolist() == want.tolist()
    assert not Json.takes_payloads and Dtype.takes_payloads  # the source hands the others a list
