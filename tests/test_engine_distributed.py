"""2 processes (torchrun, gloo) = 1 process on the same global batch, for DDP and FSDP2."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_subprocess, losses, sets, tensors


RUN = ["train.steps=3", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=3",
       "roles.student.optim.eps=1e-4"]
TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone")


@pytest.fixture(scope="module")
def single(teacher_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "single"
    from fewstep.cli import main

    assert main(["distill", "--recipe", "finetune", "--out", str(run), *sets(teacher_dir, *RUN)]) == 0
    return run


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single, teacher_dir, tmp_path, mode):
    run = tmp_path / mode
    # each rank takes 2 of the 4 samples, as 2 micro-batches of 1 (gradient sync on the last only)
    proc = cli_subprocess("distill", "--recipe", "finetune", "--out", run,
                          *sets(teacher_dir, *RUN, f"train.distributed={mode}", "train.grad_accum=2"),
                          launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # same losses (all-reduced over ranks) and grad norms, step by step
    want, got = losses(single), losses(run)
    assert sorted(got) == [1, 2, 3]
    for step in want:
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-5), (step, k)
    # the checkpoints are the same files (full state dicts) with the same values
    for step in (2, 3):
        for stem in ("roles/student", "ema/student", "optim/student"):
            a, b = tensors(single, step, stem), tensors(run, step, stem)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # only rank 0 logged and reported: one record per step, one evaluation
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/student" in r] == [1, 2, 3]
    assert json.loads((run / "evals" / "step_000003.json").read_text())["results"]
    assert proc.stdout.count("step 3/3") == 1
