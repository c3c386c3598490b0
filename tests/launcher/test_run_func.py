"""`elastic.run` as Horovod's `horovod.run`: real workers, real collectives, real etcd."""

from __future__ import annotations

import io
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import torch

import elastic as horovod
from elastic.launcher.output import pump

pytestmark = pytest.mark.timeout(180)


def reduce_and_gather(base: float, scale: float = 1.0) -> dict[str, object]:
    """A module-level function: pickled by reference, imported by the workers."""
    import elastic.torch as hvd

    hvd.init()
    mine = torch.tensor([base + hvd.rank()])
    total = hvd.allreduce(mine, op=hvd.Sum).item()
    gathered = hvd.allgather(mine.repeat(hvd.rank() + 1)).tolist()
    return {"rank": hvd.rank(), "size": hvd.size(), "sum": total * scale, "gathered": gathered}


def test_run_returns_each_ranks_result_in_rank_order() -> None:
    handler = signal.getsignal(signal.SIGINT)
    results = horovod.run(reduce_and_gather, args=(10.0,), kwargs={"scale": 2.0}, num_proc=2)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's Ctrl-C works as before
    # rank 0 holds 10, rank 1 holds 11: the sum is 21 on both; rank r sends r+1 rows.
    assert results == [
        {"rank": 0, "size": 2, "sum": 42.0, "gathered": [10.0, 11.0, 11.0]},
        {"rank": 1, "size": 2, "sum": 42.0, "gathered": [10.0, 11.0, 11.0]},
    ]


def test_elastic_run_of_a_closure() -> None:
    offset = 100  # a closure is shipped by value, with what it captured

    def rank_plus_offset(extra: int) -> tuple[int, int, float]:
        import elastic.torch as hvd

        hvd.init()
        size = hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item()
        return hvd.rank(), hvd.rank() + offset + extra, size

    with pytest.warns(DeprecationWarning, match="np is deprecated"):
        results = horovod.run(rank_plus_offset, args=(5,), np=2, min_np=1, max_np=2)
    assert results == [(0, 105, 2.0), (1, 106, 2.0)]


class BadBatch(ValueError):
    pass


def fail_on_rank_one() -> int:
    import elastic.torch as hvd

    hvd.init()
    if hvd.rank() == 1:
        raise BadBatch("batch 7 has no labels")
    hvd.barrier()
    return hvd.rank()


def test_a_raising_function_fails_the_call_naming_the_rank() -> None:
    with pytest.raises(RuntimeError, match=r"raised BadBatch on rank 1: batch 7 has no labels"
                       ) as info:
        horovod.run(fail_on_rank_one, num_proc=2)
    assert isinstance(info.value.__cause__, BadBatch)
    assert "fail_on_rank_one" in str(info.value)  # the worker's traceback is in the message


def test_version_is_horderuns(capsys: pytest.CaptureFixture[str]) -> None:
    from elastic.launcher.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"horderun {horovod.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", horovod.__version__)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"num_proc": 3, "max_num_proc": 2}, ValueError, "num_proc 3 is above max_num_proc 2"),
    ({"num_proc": 2, "min_num_proc": 3, "max_num_proc": 4}, ValueError,
     "num_proc 2 is below min_num_proc 3"),
    ({"num_proc": 0}, ValueError, "num_proc 0 must be at least 1"),
    ({"hosts": "localhost:2,far-away:4", "num_proc": 2}, ValueError,
     "the hosts include far-away"),
    ({"hosts": "localhost:2", "hostfile": "hosts.txt"}, ValueError, "hosts or hostfile"),
    ({"hosts": "localhost:x"}, ValueError, "must look like HOST or HOST:SLOTS"),
    ({"use_mpi": True}, ValueError, "use_mpi=True is not supported"),
    ({"use_gloo": True, "use_mpi": True}, ValueError, "use_gloo or use_mpi"),
])
def test_bad_arguments_are_refused_before_anything_starts(
        kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        horovod.run(reduce_and_gather, args=(0.0,), **kwargs)


def test_a_bad_rendezvous_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HORDE_RENDEZVOUS", "redis://cache:6379")
    with pytest.raises(ValueError, match="HORDE_RENDEZVOUS 'redis://cache:6379' has the unknown"):
        horovod.run(reduce_and_gather, args=(0.0,), num_proc=1)


def test_a_function_that_cannot_be_shipped(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where run() keeps its folder
    lock = threading.Lock()

    def holds_a_lock() -> bool:
        return lock.locked()

    with pytest.raises(TypeError, match="cannot ship"):
        horovod.run(holds_a_lock, num_proc=1)
    assert not list(tmp_path.iterdir())  # its private folder is gone too


def test_worker_output_reaches_a_console_without_a_byte_buffer() -> None:
    """A notebook's sys.stdout has no `.buffer`; elastic.run's workers print there too."""
    read_fd, write_fd = os.pipe()
    console = io.StringIO()
    thread = pump(os.fdopen(read_fd, "rb"), 3, "stdout", console, None)
    with os.fdopen(write_fd, "wb") as writer:
        writer.write(b"epoch 1 loss 0.5\nno newline")
    thread.join(10)
    assert console.getvalue() == "[3]<stdout>:epoch 1 loss 0.5\n[3]<stdout>:no newline\n"
