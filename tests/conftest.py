"""Test session set-up: without a GPU, triton kernels run in triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os
from importlib import metadata

import numpy
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tied_lora_kernels import kernels  # noqa: E402 (after TRITON_INTERPRET; imports no triton itself)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def pytest_configure(config):
    # triton 3.6's interpreter converts size-1 arrays to Python ints, which numpy 2.4 turned into an error
    # (loops with a runtime bound crash in every kernel); triton 3.8 fixed it. Say so instead of failing
    # hundreds of tests with a TypeError deep in the interpreter.
    if not kernels.interpreting():
        return
    try:
        triton = _version(metadata.version("triton"))
    except metadata.PackageNotFoundError:
        return
    if triton < (3, 8) and _version(numpy.__version__) >= (2, 4):
        pytest.exit(
            f"triton {metadata.version('triton')}'s CPU interpreter crashes with numpy {numpy.__version__}: "
            "install numpy<2.4 (or triton>=3.8) to run the kernel tests without a GPU",
            returncode=4,
        )


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (CPU): enough for DDP's reducer, which counts on each hook firing once, and for
    FSDP2."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
