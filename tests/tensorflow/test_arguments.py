"""Bad arguments fail with clear errors of Horovod's kinds (a world of one, no etcd), and
`elastic.tensorflow` says how to install TensorFlow when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, repo_env

SCRIPT = Path(__file__).resolve().parent / "scripts" / "argument_checks.py"


def test_missing_tensorflow_names_the_extra() -> None:
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "try:\n    import elastic.tensorflow\n"
            "except ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=repo_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "pip install 'horde[tensorflow]'" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_arguments_fail_clearly() -> None:
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                        "'.[tensorflow]')")
    env = {k: v for k, v in repo_env().items() if not k.startswith("HORDE_")}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    errors = json.loads(lines[-1][len("RESULT "):])
    expected = {
        "tape_not_a_tape": ("ValueError", "wraps a tf.GradientTape"),
        "predivide_with_sum": ("ValueError", "gradient_predivide_factor not supported"),
        "bad_compression": ("ValueError", "is not hvd.Compression"),
        "negative_num_groups": ("ValueError", "num_groups=-1"),
        "bad_groups": ("ValueError", "lists of variables"),
        "optimizer_not_keras": ("ValueError", "keras.optimizers.Optimizer"),
        "backward_passes": ("ValueError", "backward_passes_per_step=0"),
        "stale_and_passes": ("ValueError", "cannot be combined"),
        "negative_staleness": ("ValueError", "staleness=-1"),
        "staleness_in_graph": ("ValueError", "run_eagerly=True"),
        "slices_min": ("NotImplementedError", "Only Sum and Average"),
        "slices_adasum": ("NotImplementedError", "Adasum"),
        "topk_sum": ("ValueError", "op=hvd.Average"),
        "topk_mixed_dtypes": ("ValueError", "one gradient dtype"),
        "topk_density": ("ValueError", "density"),
        "commit_every_0": ("ValueError", "batches_per_commit=0"),
        "schedule_no_lr": ("ValueError", "initial_lr"),
        "schedule_no_steps": ("ValueError", "steps_per_epoch"),
        "reducescatter_adasum": ("InvalidArgumentError", "Adasum"),
        "not_a_process_set": ("ValueError", "hvd.ProcessSet"),
        "empty_group": ("ValueError", "non-empty list"),
        "negative_splits": ("InvalidArgumentError", "must not be negative"),
        "strings": ("InvalidArgumentError", "not supported"),
        "op_and_average": ("ValueError", "supersedes average"),
        "global_variables": ("RuntimeError", "broadcast_variables"),
    }
    for case, (kind, text) in expected.items():
        got = errors[case]
        assert got.startswith(kind) and text in got, f"{case}: {got}"
    assert errors["after"] == [3.0]
