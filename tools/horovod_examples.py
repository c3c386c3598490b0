"""Run Horovod's own PyTorch example scripts under horderun, with only the import changed.

    python tools/horovod_examples.py [--source DIR] [--only NAME ...] [--workdir DIR]

Horovod 0.28.1's PyPI sdist ships no examples/, so the six scripts are taken from a
Horovod source tree (`--source`, or $HORDE_HOROVOD_EXAMPLES: a checkout of tag v0.28.1 or
the examples/ folder of one) or else fetched from the v0.28.1 tag on GitHub into a cache
(~/.cache/horde/horovod-examples-0.28.1). Each script is copied into a work folder with
its Horovod import lines rewritten (`import horovod.torch as hvd` -> `import
elastic.torch as hvd`, `import horovod` -> `import elastic as horovod`) and nothing else
changed, then run by `horderun -np 2` (the elastic ones with `--min-np 1 --max-np 2`) on
small settings: fake MNIST files (scikit-learn's digits, upscaled) where the scripts would
download MNIST, a tiny ImageFolder of random images for the ImageNet ones. The elastic MNIST
script runs a second time losing rank 1 to SIGKILL in its second epoch. Prints one line per
run: ok, or FAIL with the checks that failed, and its seconds. Needs torchvision, tqdm and
tensorboard (the `horovod-examples` extra). docs/migrating-from-horovod.md has the table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOROVOD_TAG = "v0.28.1"
DOWNLOAD_URL = "https://raw.githubusercontent.com/horovod/horovod/{tag}/{path}"
DOWNLOAD_TIMEOUT_S = 20.0
STOP_GRACE_S = 15.0  # seconds horderun gets to stop after SIGTERM at a script's timeout
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "horde" / (
    "horovod-examples-" + HOROVOD_TAG.lstrip("v"))
SOURCE_ENV = "HORDE_HOROVOD_EXAMPLES"

# The only lines that change: Horovod's imports, each an exact whole line of the scripts.
IMPORT_REWRITES = {
    "import horovod.torch as hvd": "import elastic.torch as hvd",
    "import horovod": "import elastic as horovod",
}
_ANY_HOROVOD_IMPORT = re.compile(r"^\s*(import|from)\s+horovod\b", re.MULTILINE)

# Put first on the workers' PYTHONPATH: lets PyPI's torchvision load on a CPU-only torch.
SITECUSTOMIZE = "from tools import torchvision_cpu\n\ntorchvision_cpu.install()\n"


class ExamplesUnavailable(RuntimeError):
    """Horovod's example scripts could not be found or fetched (the message says why)."""


@dataclass(frozen=True)
class Example:
    """One of Horovod's scripts, how to run it small, and what its output must show."""

    name: str
    path: str  # inside Horovod's source tree
    elastic: bool
    args: Callable[[Path], list[str]]  # script arguments, given the data folder
    expect: tuple[str, ...]  # regular expressions rank 0's output must match
    files: tuple[str, ...] = ()  # globs (in the work folder) that must exist afterwards
    kill_rank_1_at: str | None = None  # SIGKILL the first rank 1 once it prints this


def _synthetic_args(data: Path) -> list[str]:
    # ResNet-18 (the script's --model flag): the ImageNet scripts train ResNet-50 already
    return ["--model", "resnet18", "--batch-size", "2", "--num-warmup-batches", "1",
            "--num-batches-per-iter", "1", "--num-iters", "2"]


def _mnist_args(data: Path) -> list[str]:
    return ["--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--test-batch-size", "100",
            "--log-interval", "20", "--data-dir", str(data / "mnist")]


def _imagenet_args(data: Path) -> list[str]:
    return ["--train-dir", str(data / "imagenet" / "train"),
            "--val-dir", str(data / "imagenet" / "val"), "--epochs", "1",
            "--batch-size", "1", "--val-batch-size", "1", "--log-dir", "logs",
            "--checkpoint-format", "checkpoint-{epoch}.pth.tar"]


_SYNTHETIC_EXPECT = (r"Number of CPUs: 2", r"Iter #1: [\d.]+ img/sec per CPU",
                     r"Total img/sec on 2 CPU\(s\): [\d.]+")
_MNIST_EXPECT = (r"Train Epoch: 1 \[", r"Test set: Average loss: [\d.]+, Accuracy: [\d.]+%")
_IMAGENET_FILES = ("checkpoint-1.pth.tar", "logs/events.out.tfevents.*")

EXAMPLES = (
    Example("synthetic_benchmark", "examples/pytorch/pytorch_synthetic_benchmark.py", False,
            _synthetic_args, _SYNTHETIC_EXPECT),
    Example("mnist", "examples/pytorch/pytorch_mnist.py", False, _mnist_args, _MNIST_EXPECT),
    Example("imagenet_resnet50", "examples/pytorch/pytorch_imagenet_resnet50.py", False,
            _imagenet_args, (), _IMAGENET_FILES),
    Example("synthetic_benchmark_elastic",
            "examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py", True,
            _synthetic_args, _SYNTHETIC_EXPECT),
    Example("mnist_elastic", "examples/elastic/pytorch/pytorch_mnist_elastic.py", True,
            _mnist_args, _MNIST_EXPECT),
    Example("imagenet_resnet50_elastic",
            "examples/elastic/pytorch/pytorch_imagenet_resnet50_elastic.py", True,
            _imagenet_args, (), _IMAGENET_FILES),
    # The elastic MNIST script again, losing a worker: rank 0 restores the last commit and
    # trains on alone (its third epoch comes after the loss), then tests.
    Example("mnist_elastic_loses_a_worker", "examples/elastic/pytorch/pytorch_mnist_elastic.py",
            True, _mnist_args, (*_MNIST_EXPECT, r"Train Epoch: 3 \["),
            kill_rank_1_at="Train Epoch: 2 ["),
)
BY_NAME = {example.name: example for example in EXAMPLES}


def find_sources(source: Path | None = None, cache: Path = DEFAULT_CACHE) -> Path:
    """The root of a tree holding every example's `path`: `source`, $HORDE_HOROVOD_EXAMPLES,
    or `cache` (filled from the GitHub tag when a script is missing there)."""
    given = source or (Path(os.environ[SOURCE_ENV]) if os.environ.get(SOURCE_ENV) else None)
    if given is not None:
        for root in (given, given.parent):  # a checkout, or its examples/ folder
            if all((root / example.path).is_file() for example in EXAMPLES):
                return root
        missing = sorted({e.path for e in EXAMPLES if not (given / e.path).is_file()})
        raise ExamplesUnavailable(
            f"{given} is not a Horovod source tree: {', '.join(missing)} not found in it "
            f"(nor in its parent); point {SOURCE_ENV} at a checkout of Horovod {HOROVOD_TAG}")
    for example in EXAMPLES:
        target = cache / example.path
        if target.is_file():
            continue
        url = DOWNLOAD_URL.format(tag=HOROVOD_TAG, path=example.path)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                text = response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ExamplesUnavailable(
                f"Horovod's example scripts are not in its PyPI sdist, and fetching {url} "
                f"failed ({exc}); set {SOURCE_ENV} to a checkout of Horovod {HOROVOD_TAG} "
                "(git clone --branch v0.28.1 https://github.com/horovod/horovod)") from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(text)
        partial.replace(target)
    return cache


def rewrite_imports(source: str) -> tuple[str, list[tuple[str, str]]]:
    """`source` with Horovod's import lines replaced; also the (old, new) lines changed.

    Raises ValueError if the script has no `import horovod.torch as hvd` line or keeps a
    Horovod import this rewrite does not know, so that a changed upstream script is noticed.
    """
    lines = source.splitlines(keepends=True)
    changed: list[tuple[str, str]] = []
    for index, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if body in IMPORT_REWRITES:
            new = IMPORT_REWRITES[body]
            lines[index] = new + line[len(body):]
            changed.append((body, new))
    result = "".join(lines)
    if ("import horovod.torch as hvd", "import elastic.torch as hvd") not in changed:
        raise ValueError("no line 'import horovod.torch as hvd' in the script; "
                         "it is not one of Horovod's PyTorch examples")
    leftover = _ANY_HOROVOD_IMPORT.search(result)
    if leftover:
        raise ValueError(f"unhandled Horovod import left in the script: {leftover.group(0)!r}")
    return result, changed


def write_fake_mnist(root: Path, n_test: int = 300) -> None:
    """MNIST's four raw IDX files under root/MNIST/raw, so torchvision does not download.

    The images are scikit-learn's bundled 8x8 digits, upscaled to 20x20 and centred in
    28x28 as MNIST's are, so a network learns from them (1497 train, n_test test images).
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    pixels = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    big = torch.nn.functional.interpolate(pixels, size=(20, 20), mode="bilinear",
                                          align_corners=False)
    canvas = torch.zeros(len(images), 28, 28)
    canvas[:, 4:24, 4:24] = big[:, 0]
    data = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    targets = np.asarray(labels, dtype=np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", slice(n_test, None)), ("t10k", slice(0, n_test))):
        x, y = data[part], targets[part]
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, len(y)) + y.tobytes())


def write_fake_imagenet(root: Path, classes: int = 2, train_per_class: int = 2,
                        val_per_class: int = 1, size: int = 32) -> None:
    """A tiny ImageFolder tree (root/train/<class>/*.JPEG, root/val/...) of random images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{label}_{index}.JPEG")


def prepare(workdir: Path) -> Path:
    """Fake data sets and the start-up hook under `workdir`; returns the data folder."""
    data = workdir / "data"
    write_fake_mnist(data / "mnist")
    write_fake_imagenet(data / "imagenet")
    hook = workdir / "pythonpath"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return data


@dataclass
class Outcome:
    """What one script's run under horderun gave."""

    example: Example
    returncode: int | None
    seconds: float
    output: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems


def horderun_command(example: Example, script: Path, data: Path) -> list[str]:
    sizes = ["-np", "2", "--min-np", "1", "--max-np", "2"] if example.elastic else ["-np", "2"]
    return [sys.executable, "-m", "elastic.launcher.cli", *sizes, "--coordinator", "none",
            sys.executable, str(script), *example.args(data)]


def run_example(example: Example, sources: Path, workdir: Path, data: Path,
                timeout: float = 600) -> Outcome:
    """Copy the script with its imports rewritten into its own folder and run it there."""
    folder = workdir / example.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    text, _ = rewrite_imports((sources / example.path).read_text())
    script = folder / Path(example.path).name
    script.write_text(text)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(workdir / "pythonpath"), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = str(folder)  # pytorch_mnist.py takes a FileLock on ~/.horovod_lock
    started = time.monotonic()
    proc = subprocess.Popen(horderun_command(example, script, data), cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []
    killed: list[int] = []
    reader = threading.Thread(target=_read, args=(proc, script, example, lines, killed),
                              daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _stop(proc)
        reader.join(10)
    output = "".join(lines)
    outcome = Outcome(example, code, time.monotonic() - started, output)
    if code != 0:
        outcome.problems.append("horderun timed out" if code is None
                                else f"horderun exited {code}")
    if example.kill_rank_1_at and not killed:
        outcome.problems.append(f"rank 1 never printed {example.kill_rank_1_at!r}, not killed")
    rank0 = "\n".join(line for line in output.splitlines() if line.startswith("[0]"))
    outcome.problems += [f"rank 0 never printed /{pattern}/" for pattern in example.expect
                         if not re.search(pattern, rank0)]
    outcome.problems += [f"no file {pattern}" for pattern in example.files
                         if not list(folder.glob(pattern))]
    return outcome


def _read(proc: subprocess.Popen, script: Path, example: Example, lines: list[str],
          killed: list[int]) -> None:
    """Collect horderun's output; SIGKILL rank 1's worker at the example's cue."""
    assert proc.stdout is not None
    cue = example.kill_rank_1_at
    for line in proc.stdout:
        lines.append(line)
        if cue and not killed and line.startswith("[1]<stdout>:") and cue in line:
            killed += _kill_worker(proc.pid, script, rank=1)
            lines.append(f"harness: SIGKILL rank 1 (pids {killed})\n")


def _kill_worker(launcher_pid: int, script: Path, rank: int) -> list[int]:
    """SIGKILL the workers of `script` under the launcher that started with `rank`."""
    import psutil

    pids = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if (str(script) in child.cmdline()
                    and child.environ().get("HOROVOD_RANK") == str(rank)):
                child.kill()
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """Stop horderun if it still runs (SIGTERM: it stops its workers and etcd), then kill
    whatever is left of its session."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="a Horovod source tree (default: "
                        f"${SOURCE_ENV}, else the {HOROVOD_TAG} scripts fetched into a cache)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where fetched scripts are kept (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="run only these")
    parser.add_argument("--workdir", type=Path, help="keep scripts, data and outputs here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per script")
    parser.add_argument("--show-output", action="store_true",
                        help="print every script's output, not only that of failures")
    args = parser.parse_args(argv)
    try:
        sources = find_sources(args.source, args.cache)
    except ExamplesUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="horovod-examples-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        data = prepare(workdir)
        outcomes = []
        for example in (BY_NAME[name] for name in args.only) if args.only else EXAMPLES:
            outcome = run_example(example, sources, workdir, data, args.timeout)
            outcomes.append(outcome)
            if args.show_output or not outcome.ok:
                print(outcome.output)
            status = "ok" if outcome.ok else "FAIL: " + "; ".join(outcome.problems)
            print(f"{example.name:<30} {outcome.seconds:6.1f} s  {status}", flush=True)
    failed = sum(not outcome.ok for outcome in outcomes)
    print(f"{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
