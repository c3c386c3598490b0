"""`elastic.torch`'s view of the process's session: the shared core session, re-exported.

The session (init / shutdown / re-init, process sets, the current generation runtime) is
framework-neutral and lives in `elastic.core.session`, so that every frontend of one
process shares one node and one world.
"""

from __future__ import annotations

from elastic.core.session import (
    ProcessSet,
    add_process_set,
    context,
    global_process_set,
    init,
    is_initialized,
    leave,
    process_set_id,
    reattach_process_sets,
    record_loss,
    register_finisher,
    remove_process_set,
    reporter,
    reset,
    reset_limit,
    runtime,
    settings,
    shutdown,
)

__all__ = [
    "ProcessSet", "add_process_set", "context", "global_process_set", "init",
    "is_initialized", "leave", "process_set_id", "reattach_process_sets", "record_loss",
    "register_finisher", "remove_process_set", "reporter", "reset", "reset_limit",
    "runtime", "settings", "shutdown",
]
