"""Runs the job's entrypoint inside the limits the volunteer set, then the script itself.

    python -m volunteer_client.worker_shim train.py ARGS...

Before the job's code runs: the CUDA memory cap (`HORDE_GPU_MEMORY_FRACTION` of the one
GPU this worker sees), torch's CPU threads (`HORDE_CPU_THREADS`), no core dumps (they
would write the job's memory to the volunteer's disk).
"""

from __future__ import annotations

import logging
import os
import resource
import runpy
import sys

logger = logging.getLogger("volunteer_client.worker")


def apply_limits() -> None:
    """Cap GPU memory and CPU threads as the volunteer's settings say."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import torch

    threads = int(os.environ.get("HORDE_CPU_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    fraction = float(os.environ.get("HORDE_GPU_MEMORY_FRACTION", "0") or 0)
    if fraction > 0 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        logger.info("GPU memory capped at %.0f%% of %s", fraction * 100,
                    torch.cuda.get_device_name(0))


def main() -> None:
    """Apply the limits, then run SCRIPT as `__main__` with ARGS as its argv."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m volunteer_client.worker_shim SCRIPT [ARGS...]")
    apply_limits()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
