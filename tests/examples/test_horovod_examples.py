"""Horovod's own PyTorch example scripts run under horderun with only their import changed.

The scripts are Horovod v0.28.1's, fetched once per test session (they are not in its
PyPI sdist) or taken from $HORDE_HOROVOD_EXAMPLES; the tests skip, saying so, when
neither works. tools/horovod_examples.py does the work and runs them by hand too.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tools import horovod_examples, torchvision_cpu
from tools.horovod_examples import (
    BY_NAME,
    EXAMPLES,
    Example,
    ExamplesUnavailable,
    find_sources,
    prepare,
    rewrite_imports,
    run_example,
    write_fake_mnist,
)

SCRIPT_TIMEOUT_S = 300


def require_example_dependencies() -> None:
    """Skip unless what Horovod's examples import (besides Horovod) is installed."""
    for module in ("torchvision", "tqdm", "tensorboard", "sklearn"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is needed by Horovod's examples; "
                        "pip install -e '.[horovod-examples]'")


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(Horovod source tree, work folder, fake data folder), made once per session."""
    require_example_dependencies()
    try:
        sources = find_sources(cache=tmp_path_factory.mktemp("horovod-src"))
    except ExamplesUnavailable as exc:
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp("horovod-examples")
    return sources, workdir, prepare(workdir)


def test_rewrite_changes_only_horovods_import_lines() -> None:
    script = ("import argparse\nimport horovod\nimport horovod.torch as hvd\n"
              "hvd.init()  # import horovod.torch as hvd\nhorovod.run(f, np=2)\n")
    text, changed = rewrite_imports(script)
    assert text == ("import argparse\nimport elastic as horovod\nimport elastic.torch as hvd\n"
                    "hvd.init()  # import horovod.torch as hvd\nhorovod.run(f, np=2)\n")
    assert changed == [("import horovod", "import elastic as horovod"),
                       ("import horovod.torch as hvd", "import elastic.torch as hvd")]


@pytest.mark.parametrize("script, complaint", [
    ("import torch\n", "no line 'import horovod.torch as hvd'"),
    ("import horovod.torch as hvd\nfrom horovod.torch.elastic import run\n",
     "unhandled Horovod import left in the script: 'from horovod'"),
])
def test_rewrite_refuses_scripts_it_would_not_fully_convert(script: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        rewrite_imports(script)


def test_a_source_tree_without_the_examples_is_refused(tmp_path: Path) -> None:
    (tmp_path / "examples" / "pytorch").mkdir(parents=True)
    with pytest.raises(ExamplesUnavailable, match="is not a Horovod source tree: "
                       "examples/elastic/pytorch/pytorch_imagenet_resnet50_elastic.py"):
        find_sources(tmp_path)
    with pytest.raises(ExamplesUnavailable, match="is not a Horovod source tree"):
        find_sources(tmp_path / "examples")


@pytest.fixture
def tag_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real HTTP server standing in for GitHub's raw files; yields the folder it serves."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(horovod_examples, "DOWNLOAD_URL",
                        f"http://127.0.0.1:{server.server_port}/{{tag}}/{{path}}")
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def test_scripts_are_fetched_from_the_tag_once_then_read_from_the_cache(
        tmp_path: Path, tag_server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HORDE_HOROVOD_EXAMPLES", raising=False)
    for example in EXAMPLES:
        script = tag_server / "v0.28.1" / example.path
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(f"# {example.path}\nimport horovod.torch as hvd\n")
    cache = tmp_path / "cache"
    assert find_sources(cache=cache) == cache
    for example in EXAMPLES:
        assert (cache / example.path).read_text().startswith(f"# {example.path}\n")
    for script in (tag_server / "v0.28.1").rglob("*.py"):
        script.unlink()  # from now on the server has nothing: the cache must serve
    assert find_sources(cache=cache) == cache


def test_a_failed_fetch_says_what_failed_and_what_to_do(
        tmp_path: Path, tag_server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HORDE_HOROVOD_EXAMPLES", raising=False)
    with pytest.raises(ExamplesUnavailable, match=r"not in its PyPI sdist, and fetching "
                       r"http://127\.0\.0\.1:\d+/v0\.28\.1/examples/.*404.*set "
                       r"HORDE_HOROVOD_EXAMPLES to a checkout of Horovod v0\.28\.1"):
        find_sources(cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.py"))


def test_fake_mnist_is_what_torchvision_reads_without_downloading(tmp_path: Path) -> None:
    require_example_dependencies()
    torchvision_cpu.install()
    from torchvision import datasets
    write_fake_mnist(tmp_path, n_test=300)
    train = datasets.MNIST(str(tmp_path), train=True, download=True)
    test = datasets.MNIST(str(tmp_path), train=False)
    assert (len(train), len(test)) == (1797 - 300, 300)
    assert tuple(train.data.shape[1:]) == (28, 28)
    assert sorted(set(test.targets.tolist())) == list(range(10))
    assert train.data[:, :4].max() == 0 and train.data[:, 4:24].float().mean() > 20


@pytest.mark.slow
def test_only_the_import_lines_of_the_real_scripts_change(
        upstream: tuple[Path, Path, Path]) -> None:
    sources, _, _ = upstream
    for example in EXAMPLES:
        original = (sources / example.path).read_text().splitlines()
        rewritten, changed = rewrite_imports((sources / example.path).read_text())
        differing = [(old, new) for old, new in zip(original, rewritten.splitlines())
                     if old != new]
        assert len(rewritten.splitlines()) == len(original)
        assert differing == changed and changed, example.path


@pytest.mark.slow
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", [example.name for example in EXAMPLES])
def test_horovod_example_runs_under_horderun(upstream: tuple[Path, Path, Path],
                                             name: str) -> None:
    sources, workdir, data = upstream
    outcome = run_example(BY_NAME[name], sources, workdir, data, timeout=SCRIPT_TIMEOUT_S)
    assert outcome.ok, "; ".join(outcome.problems) + "\n" + outcome.output[-6000:]
    if name.startswith("mnist"):
        # scikit-learn's digits as MNIST: 3 epochs reach ~90%; chance is 10%
        accuracy = float(re.findall(r"Accuracy: ([\d.]+)%", outcome.output)[-1])
        assert accuracy >= 70, outcome.output[-3000:]


def _tree_with(tmp_path: Path, path: str, script: str) -> Path:
    (tmp_path / "src" / path).parent.mkdir(parents=True)
    (tmp_path / "src" / path).write_text(script)
    return tmp_path / "src"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failing_script_is_reported_with_every_check_that_failed(tmp_path: Path) -> None:
    example = Example("broken", "examples/pytorch/broken.py", False, lambda data: [],
                      expect=("Total img/sec",), files=("checkpoint-*",),
                      kill_rank_1_at="Train Epoch: 2 [")
    sources = _tree_with(tmp_path, example.path,
                         "import sys\nimport horovod.torch as hvd\nhvd.init()\nsys.exit(3)\n")
    outcome = run_example(example, sources, tmp_path / "work", tmp_path, timeout=120)
    assert not outcome.ok
    assert outcome.problems == [
        f"horderun exited {outcome.returncode}",
        "rank 1 never printed 'Train Epoch: 2 [', not killed",
        "rank 0 never printed /Total img/sec/",
        "no file checkpoint-*",
    ]
    assert outcome.returncode not in (0, None)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_script_past_its_timeout_is_stopped_with_its_workers(tmp_path: Path) -> None:
    example = Example("hangs", "examples/pytorch/hangs.py", False, lambda data: [], expect=())
    sources = _tree_with(tmp_path, example.path,
                         "import time\nimport horovod.torch as hvd\ntime.sleep(600)\n")
    outcome = run_example(example, sources, tmp_path / "work", tmp_path, timeout=5)
    assert outcome.problems == ["horderun timed out"] and outcome.returncode is None
    script = str(tmp_path / "work" / "hangs" / "hangs.py")
    left = [p for p in psutil.process_iter(["cmdline"]) if script in (p.info["cmdline"] or [])]
    assert left == []
