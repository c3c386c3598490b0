"""Horovod's own PyTorch example scripts run under horderun with only their import changed.

The scripts are Horovod v0.28.1's, fetched once per test session (they are not in its
PyPI sdist) or taken from $HORDE_HOROVOD_EXAMPLES; the tests skip, saying so, when
neither works. tools/horovod_examples.py does the work and runs them by hand too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tools import torchvision_cpu
from tools.horovod_examples import (
    BY_NAME,
    EXAMPLES,
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
def horovod_examples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
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
    with pytest.raises(ExamplesUnavailable, match="is not a Horovod source tree: "
                       "examples/pytorch/pytorch_synthetic_benchmark.py"):
        find_sources(tmp_path)


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
        horovod_examples: tuple[Path, Path, Path]) -> None:
    sources, _, _ = horovod_examples
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
def test_horovod_example_runs_under_horderun(horovod_examples: tuple[Path, Path, Path],
                                             name: str) -> None:
    sources, workdir, data = horovod_examples
    outcome = run_example(BY_NAME[name], sources, workdir, data, timeout=SCRIPT_TIMEOUT_S)
    assert outcome.ok, "; ".join(outcome.problems) + "\n" + outcome.output[-6000:]
    if name.startswith("mnist"):
        # scikit-learn's digits as MNIST: 3 epochs reach ~90%; chance is 10%
        accuracy = float(re.findall(r"Accuracy: ([\d.]+)%", outcome.output)[-1])
        assert accuracy >= 70, outcome.output[-3000:]
