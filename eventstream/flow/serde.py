"""Serde: how a flow turns payload bytes into values (input) and values into payload bytes (output).

    Bytes()        values are the payload bytes themselves
    Json()         json.loads per event (values: dicts, lists, numbers...); encode: json.dumps
    Dtype(dtype)   a fixed binary layout given as a numpy dtype: the whole batch of payloads is joined
                   and decoded with one np.frombuffer into a structured array (no per-event Python);
                   encode: the rows' bytes
    Text()         UTF-8 strings

`decode(payloads)` takes a list of bytes and returns a column (list or numpy array) plus the positions
it could not decode with the reason (those events go to the dead-letter log, never silently away).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from eventstream.flow.batch import Payloads


class SerdeError(ValueError):
    """A value cannot be encoded for an output (the message says which value and what is allowed)."""


class Serde:
    name = "serde"
    # True: decode() also takes a flow.batch.Payloads column (the log's bytes, no object per event);
    # False: it gets a list of bytes
    takes_payloads = False

    def decode(self, payloads: list[bytes]) -> tuple[Any, list[tuple[int, str]]]:
        raise NotImplementedError

    def encode(self, values) -> list[bytes]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bytes(Serde):
    name = "bytes"

    def decode(self, payloads):
        return payloads, []

    def encode(self, values):
        return [encode_any(v) for v in values]


class Text(Serde):
    name = "text"

    def decode(self, payloads):
        out, bad = [], []
        for i, p in enumerate(payloads):
            try:
                out.append(p.decode("utf-8"))
            except UnicodeDecodeError as exc:
                out.append(None)
                bad.append((i, f"serde: payload is not UTF-8 ({exc.reason} at byte {exc.start})"))
        return out, bad

    def encode(self, values):
        return [v.encode("utf-8") if isinstance(v, str) else encode_any(v) for v in values]


class Json(Serde):
    name = "json"

    def decode(self, payloads):
        loads = json.loads
        try:
            return [loads(p) for p in payloads], []
        except ValueError:
            pass
        out, bad = [], []
        for i, p in enumerate(payloads):
            try:
                out.append(loads(p))
            except ValueError as exc:
                out.append(None)
                bad.append((i, f"serde: payload is not JSON ({str(exc)[:80]})"))
        return out, bad

    def encode(self, values):
        return [encode_json(v) for v in values]


class Dtype(Serde):
    """Payloads of exactly dtype.itemsize bytes, decoded for the whole batch at once."""

    name = "dtype"
    takes_payloads = True

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype.itemsize == 0:
            raise ValueError(f"Dtype({dtype!r}): an empty dtype is not allowed; allowed: a numpy dtype of >= 1 byte")

    def __repr__(self) -> str:
        return f"Dtype({self.dtype!r})"

    def decode(self, payloads):
        size = self.dtype.itemsize
        if isinstance(payloads, Payloads):
            if bool((payloads.lens == size).all()):  # one slice (or join) of the log's bytes, one frombuffer
                return np.frombuffer(payloads.joined(), dtype=self.dtype).copy(), []
            payloads = payloads.tolist()
        if set(map(len, payloads)) <= {size}:  # the common case: one join, one frombuffer
            return np.frombuffer(b"".join(payloads), dtype=self.dtype).copy(), []
        ok = [i for i, p in enumerate(payloads) if len(p) == size]
        bad = [
            (i, f"serde: payload of {len(p)} bytes does not match the dtype's {size} bytes")
            for i, p in enumerate(payloads)
            if len(p) != size
        ]
        arr = np.zeros(len(payloads), dtype=self.dtype)
        if ok:
            arr[ok] = np.frombuffer(b"".join(payloads[i] for i in ok), dtype=self.dtype)
        return arr, bad

    def encode(self, values):
        if isinstance(values, np.ndarray):
            arr = values.astype(self.dtype, copy=False)
            raw = arr.tobytes()
            size = self.dtype.itemsize
            return [raw[i * size : (i + 1) * size] for i in range(len(arr))]
        return [np.array(v, dtype=self.dtype).tobytes() if not isinstance(v, bytes) else v for v in values]


def _default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if hasattr(v, "_asdict"):
        return v._asdict()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    raise TypeError(f"value of type {type(v).__name__} is not JSON serializable")


def encode_json(v) -> bytes:
    if hasattr(v, "_asdict"):
        v = v._asdict()
    elif isinstance(v, np.void) and v.dtype.names:
        v = {n: v[n] for n in v.dtype.names}
    try:
        return json.dumps(v, default=_default, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise SerdeError(
            f"output value {v!r:.80} cannot be encoded as JSON ({exc}); allowed: bytes, str, "
            "numbers, dicts, lists, tuples and numpy values"
        ) from None


def encode_any(v) -> bytes:
    """The default output encoding: bytes as they are, str as UTF-8, anything else as JSON."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, np.void) and not v.dtype.names:
        return v.tobytes()
    return encode_json(v)


SERDES = {"bytes": Bytes, "json": Json, "text": Text}


def resolve(serde) -> Serde:
    """A Serde from an instance, a numpy dtype, or a name ("bytes", "json", "text")."""
    if isinstance(serde, Serde):
        return serde
    if isinstance(serde, str) and serde in SERDES:
        return SERDES[serde]()
    if isinstance(serde, np.dtype) or (isinstance(serde, list) and serde):
        return Dtype(serde)
    raise ValueError(
        f"serde {serde!r} is not allowed; allowed: {', '.join(SERDES)}, a numpy dtype, "
        "or a Serde instance (eventstream.flow.serde)"
    )
