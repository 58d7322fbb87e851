"""Shared fixtures: tiny random models built in the test (nothing is downloaded or shipped).

Shared helper functions and classes are in ``helpers.py``.
"""

from pathlib import Path

import pytest
import torch

from fewstep.models.pipeline import VideoPipeline
from helpers import RUN, make_tiny_pipeline, sets


@pytest.fixture
def tiny_pipeline() -> VideoPipeline:
    return make_tiny_pipeline()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory) -> Path:
    """A tiny random WanPipeline directory (tests/helpers.py::make_tiny_wan_pipeline); tests only read it."""
    from helpers import make_tiny_wan_pipeline

    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random model saved as a model directory (the toy teacher's weights are never used)."""
    path = tmp_path_factory.mktemp("engine") / "teacher"
    make_tiny_pipeline().save(path)
    return path


@pytest.fixture(scope="module")
def reference_run(teacher_dir, tmp_path_factory):
    """The uninterrupted run of :data:`helpers.RUN` (checkpoints at 3 and 6) that resumed runs must equal."""
    run = tmp_path_factory.mktemp("resume") / "reference"
    from fewstep.cli import main

    assert main(["distill", "--recipe", "finetune", "--out", str(run),
                 *sets(teacher_dir, *RUN, "train.checkpoint_every=3")]) == 0
    return run
