"""Messages between two ranks over MLX's point-to-point `send` / `recv`.

A message is a fixed head (kind, payload bytes, buffer count), a payload (a JSON header and
NumPy arrays in one `.npz` buffer, read back with `allow_pickle=False`) and optionally MLX
tensors, sent as one flat buffer per dtype (bfloat16 included: the weights) and cut back into
their shapes. The receiver learns every size from what came before it, so nothing needs a
template.

Sends run on a stream of their own and are not waited for: a process goes on computing while
its message is written, and a send that waits for its reader never blocks a receive on the
other stream (two large messages crossing each other cannot deadlock). Receives block the
caller. MLX's ring backend polls its sockets without pause while a transfer is pending, which
on a machine whose processes share cores slows the others' compute (about 2x on a 2-core VM);
so a receiver that knows roughly when a message will come sleeps until just before
(`recv(not_before=...)`: the trainer does, from the workers' reported job times, see
`coordinator.Wakeups`). A late estimate costs waiting time, an early one only socket polling:
timing never changes what is computed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

JOB, WEIGHTS, RESULT, ERROR, STOP = 1, 2, 3, 4, 5
KIND_NAMES = {JOB: "job", WEIGHTS: "weights", RESULT: "result", ERROR: "error", STOP: "stop"}
_HEADER_KEY = "__header__"
# Sends older than this many are waited for before a new one goes out (keeps the arrays they
# hold from piling up; by then they have long been read).
MAX_PENDING_SENDS = 16


class PeerLost(RuntimeError):
    """The connection to another rank broke (its process died or its host went away)."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"lost the connection to rank {rank} ({detail})")
        self.rank = rank


@dataclass
class Message:
    kind: int
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: list[mx.array] = field(default_factory=list)

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A JSON header and NumPy arrays as one uint8 buffer (an .npz archive)."""
    arrays = arrays or {}
    if _HEADER_KEY in arrays:
        raise ValueError(f"{_HEADER_KEY!r} is reserved for the header")
    buf = io.BytesIO()
    head = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, **{_HEADER_KEY: head}, **arrays)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def decode(payload: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(np.asarray(payload, dtype=np.uint8).tobytes()), allow_pickle=False) as z:
        header = json.loads(z[_HEADER_KEY].tobytes())
        return header, {k: z[k] for k in z.files if k != _HEADER_KEY}


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _flatten_by_dtype(tensors: list[mx.array]) -> list[mx.array]:
    """One flat buffer per dtype, in order of first appearance: a few sends instead of one per
    tensor (MLX bounds the tasks in flight, so hundreds of pending sends would block the caller)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.reshape(-1))
    flat = [mx.concatenate(g) if len(g) > 1 else g[0] for g in groups.values()]
    mx.eval(flat)
    return flat


def _buffer_sizes(specs: list[tuple[tuple, Any]]) -> dict:
    """dtype -> elements of its flat buffer, in order of first appearance."""
    sizes: dict = {}
    for shape, dtype in specs:
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    return sizes


def _unflatten(specs: list[tuple[tuple, Any]], flat: list[mx.array]) -> list[mx.array]:
    """The tensors of `specs` ((shape, dtype) in order) cut out of `_flatten_by_dtype`'s buffers."""
    buffers = dict(zip(_buffer_sizes(specs), flat))
    tensors, offsets = [], dict.fromkeys(buffers, 0)
    for shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64))
        tensors.append(buffers[dtype][offsets[dtype] : offsets[dtype] + n].reshape(shape))
        offsets[dtype] += n
    return tensors


class Link:
    """This rank's messages to and from the other ranks of `group` (an mx.distributed.Group)."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self._send_stream = mx.new_stream(mx.cpu)
        self._recv_stream = mx.new_stream(mx.cpu)
        self._pending: list[list[mx.array]] = []

    def send(self, dst: int, kind: int, header: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None, tensors: list[mx.array] = ()) -> None:
        tensors = list(tensors)
        header = dict(header or {})
        if tensors:
            header["tensors"] = [[list(t.shape), _dtype_name(t.dtype)] for t in tensors]
        payload = encode(header, arrays)
        flat = _flatten_by_dtype(tensors)
        head = mx.array([kind, payload.size, len(flat)], dtype=mx.int64)
        sends = []
        for x in (head, mx.array(payload), *flat):
            out = mx.distributed.send(x, dst, group=self.group, stream=self._send_stream)
            mx.async_eval(out)  # one at a time: the stream runs them in this order
            sends.append(out)
        self._pending.append(sends)
        while len(self._pending) > MAX_PENDING_SENDS:
            self._wait(self._pending.pop(0), dst)

    def recv(self, src: int, not_before: float | None = None) -> Message:
        """The next message from `src` (blocks until it has arrived).

        not_before: a `time.time()` before which the message is not expected; the process
        sleeps until then instead of waiting on the socket (see `Wakeups`)."""
        if not_before is not None:
            time.sleep(max(0.0, not_before - time.time()))
        kind, nbytes, nflat = (int(v) for v in self._recv((3,), mx.int64, src).tolist())
        header, arrays = decode(np.asarray(self._recv((nbytes,), mx.uint8, src)))
        specs = [(tuple(shape), getattr(mx, dtype)) for shape, dtype in header.get("tensors", [])]
        sizes = _buffer_sizes(specs)
        if len(sizes) != nflat:
            raise RuntimeError(f"a message from rank {src} announced {nflat} buffers for {len(sizes)} dtypes")
        flat = [self._recv((n,), dtype, src) for dtype, n in sizes.items()]
        return Message(kind, header, arrays, _unflatten(specs, flat))

    def flush(self) -> None:
        """Wait until every message sent so far has been written."""
        while self._pending:
            self._wait(self._pending.pop(0), None)

    def _recv(self, shape, dtype, src: int) -> mx.array:
        out = mx.distributed.recv(shape, dtype, src, group=self.group, stream=self._recv_stream)
        try:
            mx.eval(out)
        except RuntimeError as e:
            raise PeerLost(src, str(e).strip()) from e
        return out

    @staticmethod
    def _wait(sends: list[mx.array], dst) -> None:
        try:
            mx.eval(sends)
        except RuntimeError as e:
            raise PeerLost(-1 if dst is None else dst, str(e).strip()) from e
