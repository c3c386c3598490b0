"""A worker of `elastic.run`: load the function, call it, hand back its result or its error.

Run as `python -m elastic.launcher.run_task` with `HORDE_RUN_DIR` set to the caller's
private folder. The function comes from the job owner's own process on this machine, so
loading it with cloudpickle runs nobody else's code; no peer ever sends this file.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

import cloudpickle

#: Environment variable naming the folder `elastic.run` shares with its workers.
RUN_DIR_ENV = "HORDE_RUN_DIR"
FUNC_FILE = "func.pkl"


def record_path(run_dir: str, index: str) -> str:
    """Where worker `index` (its launch order) leaves its record."""
    return os.path.join(run_dir, f"record-{index}.pkl")


def _write(run_dir: str, index: str, record: dict[str, Any]) -> None:
    path = record_path(run_dir, index)
    with open(path + ".tmp", "wb") as handle:
        handle.write(cloudpickle.dumps(record))
    os.replace(path + ".tmp", path)  # the caller never reads half a record


def _failure(exc: BaseException) -> dict[str, Any]:
    try:
        error = cloudpickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is described instead
        error = None
    return {"ok": False, "error": error, "type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def main() -> int:
    run_dir = os.environ[RUN_DIR_ENV]
    index = os.environ.get("HORDE_ORDER", "0")
    with open(os.path.join(run_dir, FUNC_FILE), "rb") as handle:
        func, args, kwargs = cloudpickle.load(handle)
    try:
        value = func(*args, **kwargs)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _write(run_dir, index, {**_failure(exc), "rank": _rank(), "when": time.time()})
            raise
        value = None
    except BaseException as exc:
        _write(run_dir, index, {**_failure(exc), "rank": _rank(), "when": time.time()})
        raise  # the traceback also reaches the caller's console through the worker's stderr
    record = {"ok": True, "rank": _rank(), "size": _size(), "when": time.time()}
    try:
        record["value"] = value
        _write(run_dir, index, record)
    except Exception as exc:  # noqa: BLE001 - reported to the caller as this rank's error
        problem = TypeError(f"the value returned by the function on rank {record['rank']} "
                            f"cannot be pickled: {exc}")
        _write(run_dir, index, {**_failure(problem), "rank": record["rank"],
                                "when": time.time()})
        sys.stderr.write(f"{problem}\n")
        return 1
    return 0


def _rank() -> int:
    """The rank at the end (elastic resets update `HOROVOD_RANK` in this process)."""
    return int(os.environ.get("HOROVOD_RANK", os.environ.get("HORDE_ORDER", "0")))


def _size() -> int:
    return int(os.environ.get("HOROVOD_SIZE", "1"))


if __name__ == "__main__":
    sys.exit(main())
