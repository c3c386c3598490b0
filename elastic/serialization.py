"""Python objects on the wire between members: data by default, code only when trusted.

Volunteers are untrusted (../shared/DESIGN.md, "Trust"), so bytes that came from a peer
are never unpickled with arbitrary globals: by default an object travels in torch's own
format (`torch.save`) and is read back with torch's weights-only unpickler, which builds
only tensors, numbers, strings, containers and the allowlisted types below (numpy arrays,
OrderedDict, frozenset, torch dtypes and devices). That covers what scripts really
broadcast: state dicts, optimizer and LR-scheduler states, epoch counters, configs.

A job whose members are all trusted (one owner's cluster) may opt in to full pickling
(`horderun --trusted-peers`, `HORDE_TRUSTED_PEERS=1`); lambdas and custom classes then
travel by cloudpickle, as in Horovod. Each blob starts with a one-byte tag naming its
format, so a worker that does not trust its peers rejects a full pickle before reading it.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from elastic.errors import ObjectNotAllowedError, ObjectTooLargeError

logger = logging.getLogger(__name__)

RESTRICTED = 0x52  # b"R": torch.save, read with the weights-only unpickler
PICKLE = 0x50  # b"P": cloudpickle, read only by a worker that trusts its peers

OPT_IN = ("if every member of this job is trusted, start the workers with "
          "horderun --trusted-peers (or HORDE_TRUSTED_PEERS=1) to pickle arbitrary objects")
ALLOWED = ("tensors, numbers, strings, bytes, None, lists, tuples, dicts, sets, OrderedDict, "
           "numpy arrays and scalars, torch dtypes and devices (state dicts of models, "
           "optimizers and LR schedulers are made of these)")

_lock = threading.Lock()


def _numpy_globals() -> list[Any]:
    """numpy's reconstructors under both module names (numpy 1 `core`, numpy 2 `_core`)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    found: list[Any] = [np.ndarray, np.dtype]
    # numpy 2 builds each dtype as an instance of its class (numpy.dtypes.Float32DType...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in getattr(dtypes, "__all__", ())
                  if name.endswith("DType") and isinstance(getattr(dtypes, name), type)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found.append((multiarray._reconstruct, f"{module}._reconstruct"))
        found.append((multiarray.scalar, f"{module}.scalar"))
    return found


def safe_globals(extra: Sequence[Any] = ()) -> list[Any]:
    """The globals the weights-only unpickler may build besides torch's own defaults."""
    return [OrderedDict, frozenset, *_numpy_globals(), *extra]


@contextmanager
def _allowlisted(extra: Sequence[Any]) -> Iterator[None]:
    """Widen torch's weights-only allowlist by ours for one load, then narrow it again.

    Only entries the process did not already allow are added (and later removed), so a
    script's own `torch.serialization.add_safe_globals` stays as it was.
    """
    with _lock:
        present = set(torch.serialization.get_safe_globals())
        added = [g for g in safe_globals(extra) if g not in present]
        with torch.serialization.safe_globals(added):
            yield


def encode(obj: Any, trusted: bool, extra_safe: Sequence[Any] = ()) -> bytes:
    """`obj` as a tagged blob; ObjectNotAllowedError (naming the type) if a worker that
    does not trust its peers would refuse it."""
    if trusted:
        import cloudpickle

        return bytes([PICKLE]) + cloudpickle.dumps(obj)
    buffer = io.BytesIO()
    buffer.write(bytes([RESTRICTED]))
    try:
        torch.save(obj, buffer)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ObjectNotAllowedError(
            f"cannot send an object of type {type(obj).__name__} to peers: {exc}. Peers accept "
            f"{ALLOWED}; {OPT_IN}") from exc
    data = buffer.getvalue()
    with _allowlisted(extra_safe):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data[1:]))
    if unsafe:
        raise ObjectNotAllowedError(
            f"cannot send an object of type {type(obj).__name__} to peers that do not trust "
            f"each other: it holds {', '.join(sorted(set(unsafe)))}. Peers accept {ALLOWED}; "
            f"{OPT_IN}")
    return data


def decode(data: bytes | memoryview, trusted: bool, source: str,
           extra_safe: Sequence[Any] = ()) -> Any:
    """The object in a blob that `source` (e.g. "rank 1") sent; ObjectNotAllowedError if
    it holds anything but data, or a full pickle that this worker does not trust."""
    view = memoryview(data)
    if len(view) == 0:
        raise ObjectNotAllowedError(f"{source} sent an empty object blob")
    tag = view[0]
    if tag == PICKLE:
        if not trusted:
            raise ObjectNotAllowedError(
                f"{source} sent a full pickle (it trusts its peers) but this worker does not "
                f"trust peers, so it was not unpickled; {OPT_IN} on every worker")
        return pickle.loads(view[1:])
    if tag != RESTRICTED:
        raise ObjectNotAllowedError(
            f"{source} sent an object blob of unknown format (tag {tag:#04x}; a Horde older "
            "than this one sends untagged pickles); nothing was unpickled. Run the same "
            "Horde version on every member")
    try:
        with _allowlisted(extra_safe):
            return torch.load(io.BytesIO(view[1:]), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ObjectNotAllowedError(
            f"{source} sent an object that is not plain data ({_what(exc)}); it was refused "
            f"and nothing in it ran. Peers accept {ALLOWED}; {OPT_IN}") from None
    except (RuntimeError, ValueError, EOFError, OSError, KeyError) as exc:
        raise ObjectNotAllowedError(f"{source} sent a malformed object blob: {exc}") from None


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _what(exc: BaseException) -> str:
    """The part of a weights-only error that says what was refused."""
    text = str(exc)
    match = _GLOBAL.search(text)
    if match:
        return f"it refers to {match.group(1)}"
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe(encode_fn: Callable[[], bytes]) -> tuple[bytes | None, ObjectNotAllowedError | None]:
    """Run `encode_fn`, returning its blob or the refusal (collectives must go on either way)."""
    try:
        return encode_fn(), None
    except ObjectNotAllowedError as exc:
        return None, exc


__all__ = ["encode", "decode", "describe", "safe_globals", "ObjectNotAllowedError"]


def check_sizes(what: str, sizes: Sequence[int], limit: int) -> None:
    """Refuse announced object sizes (by rank) over `limit` bytes, before any buffer of
    that size exists: a peer's size is hostile until checked (ObjectTooLargeError)."""
    over = {rank: n for rank, n in enumerate(sizes) if n > limit}
    if over:
        listed = ", ".join(f"rank {rank}: {n} bytes" for rank, n in over.items())
        raise ObjectTooLargeError(
            f"{what}: refused an object larger than HORDE_MAX_OBJECT_BYTES={limit} ({listed}); "
            "nothing was allocated. If this job really sends objects that large, set "
            "HORDE_MAX_OBJECT_BYTES higher on every worker")
