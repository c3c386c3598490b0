"""Horde's training side: `elastic.torch` is the Horovod API, `elastic.run` is `horovod.run`.

`import elastic as horovod` gives `horovod.run(fn, num_proc=...)` and `horovod.__version__`
(Horde's own version); the launcher behind `run` loads on first use, so importing
`elastic.torch` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "run"]

if TYPE_CHECKING:
    from elastic.launcher.run_func import run


def __getattr__(name: str) -> Any:
    if name != "run":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from elastic.launcher.run_func import run

    globals()["run"] = run
    return run
