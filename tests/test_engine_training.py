"""Engine invariants: gradient accumulation, cadence, stages, LR warm-up, non-finite steps, bf16 +
gradient checkpointing, and the checkpoint helpers."""

from __future__ import annotations

import json
import random
from typing import Literal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewstep.engine.checkpoint import capture_rng, flatten_optimizer_state, restore_rng, unflatten_optimizer_state
from fewstep.engine.distributed import DistEnv, full_optimizer_state
from fewstep.engine.trainer import Trainer
from fewstep.objectives.base import Objective, ObjectiveConfig, register_objective
from fewstep.recipes.base import recipe_class
from helpers import TINY, cli, losses, sets, tensors, trainer_state

Finetune = recipe_class("finetune")


class NaNLossConfig(ObjectiveConfig):
    kind: Literal["test_nan"] = "test_nan"
    at_steps: list[int] | None = None  # None = every step


@register_objective
class NaNLoss(Objective):
    """A loss that is NaN (at chosen steps) but still depends on the role's weights."""

    kind = "test_nan"
    Config = NaNLossConfig

    def __call__(self, batch, roles, ctx):
        out = roles[self.role].module(batch.latents, torch.full((len(batch),), 0.5), batch.cond)
        value = out.flatten(1).mean(1) * 0.0
        if self.config.at_steps is None or ctx.step in self.config.at_steps:
            value = value * float("nan")
        return self.output({"nan": value})


def run(capsys, tmp_path, teacher, *extra, name="run"):
    out = tmp_path / name
    rc, stdout, err = cli(capsys, "distill", "--recipe", "finetune", "--out", out, *sets(teacher, *extra))
    return rc, out, stdout, err


def test_grad_accumulation_matches_big_batch(teacher_dir, tmp_path, capsys):
    """TRL's invariant: batch 4 × accumulation 1 = 4 micro-batches of 1 = 2 of 2.

    The gradients agree to float rounding. Adam divides by sqrt(v) + eps, which turns rounding in
    components whose gradient is ~0 into full-size updates, so this test uses eps = 1e-4 to keep
    the update a smooth function of the gradient.
    """
    common = ("train.steps=3", "train.batch_size=4", "roles.student.optim.eps=1e-4")
    runs = {}
    for accum in (1, 2, 4):
        rc, out, _, err = run(capsys, tmp_path, teacher_dir, *common, f"train.grad_accum={accum}", name=f"a{accum}")
        assert rc == 0, err
        runs[accum] = out
    ref_losses, ref_w = losses(runs[1]), tensors(runs[1], 3)
    for accum in (2, 4):
        got = losses(runs[accum])
        for step, values in ref_losses.items():
            for k, v in values.items():
                assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (accum, step, k)
        w = tensors(runs[accum], 3)
        for k, v in ref_w.items():
            torch.testing.assert_close(w[k], v, rtol=0, atol=2e-6)


def test_cadence_and_stages(teacher_dir, tmp_path, capsys):
    """fake_score with every: 5 steps 1/5 as often; a second stage switches objectives."""
    rc, out, _, err = run(capsys, tmp_path, teacher_dir, "train.steps=10", "roles.fake_score.optim.lr=1e-3",
                          "roles.fake_score.every=5", "stages.finetune.objectives.fs.kind=flow_matching",
                          "stages.finetune.objectives.fs.role=fake_score")
    assert rc == 0, err
    assert trainer_state(out, 10)["roles"] == {"student": {"updates": 10}, "fake_score": {"updates": 2}}
    log = losses(out)
    assert [s for s in log if "loss/fake_score" in log[s]] == [5, 10]
    assert all("loss/student" in log[s] for s in range(1, 11))

    rc, out, _, err = run(capsys, tmp_path, teacher_dir, "train.steps=5", "roles.fake_score.optim.lr=1e-3",
                          "stages.finetune.steps=2", "stages.second.every.fake_score=2",
                          "stages.second.objectives.fs.kind=flow_matching", "stages.second.objectives.fs.role=fake_score",
                          name="stages")
    assert rc == 0, err
    log = losses(out)
    assert [s for s in log if "loss/student" in log[s]] == [1, 2]
    # stage "second" covers steps 3..5; its every: 2 fires on its 2nd step (step 4), its 4th is past train.steps
    assert [s for s in log if "loss/fake_score" in log[s]] == [4]
    assert trainer_state(out, 5)["stage"] == 1


def test_lr_warmup_is_linear(teacher_dir, tmp_path, capsys):
    rc, out, _, err = run(capsys, tmp_path, teacher_dir, "train.steps=6", "roles.student.optim.warmup_steps=4",
                          "roles.student.optim.lr=1e-3")
    assert rc == 0, err
    lrs = [losses(out)[s]["lr/student"] for s in range(1, 7)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_non_finite_steps_are_skipped_then_stop(teacher_dir, tmp_path, capsys):
    # one bad step: skipped (no update, no EMA), the run goes on
    rc, out, stdout, err = run(capsys, tmp_path, teacher_dir, "train.steps=4",
                               "stages.finetune.objectives.bad.kind=test_nan", "stages.finetune.objectives.bad.at_steps=[1]")
    assert rc == 0, err
    assert "step 2: non-finite loss or gradient for student; update skipped (1/10 in a row)" in stdout
    assert trainer_state(out, 4)["roles"]["student"]["updates"] == 3
    assert "lr/student" not in losses(out)[2]
    # always bad: stops after train.max_bad_steps in a row, weights untouched, state checkpointed
    rc, out, _, err = run(capsys, tmp_path, teacher_dir, "train.steps=10", "train.max_bad_steps=3",
                          "stages.finetune.objectives.bad.kind=test_nan", name="stopped")
    assert rc == 2 and err.count("\n") == 1
    assert "training stopped at step 3: 3 steps in a row had non-finite losses" in err
    teacher = load_file(teacher_dir / "backbone.safetensors")
    saved = tensors(out, 3)
    for k, v in teacher.items():
        assert torch.equal(saved[f"backbone.module.{k}"], v), k
    assert torch.equal(tensors(out, 3, "ema/student")["backbone.module.final_layer.linear.bias"],
                       teacher["final_layer.linear.bias"])


class AutocastProbeConfig(ObjectiveConfig):
    kind: Literal["test_autocast_probe"] = "test_autocast_probe"


@register_objective
class AutocastProbe(Objective):
    """Records the autocast state the engine runs objectives under, and the dtype of the role's output."""

    kind = "test_autocast_probe"
    Config = AutocastProbeConfig
    seen: list[dict] = []

    def __call__(self, batch, roles, ctx):
        device = batch.latents.device.type
        out = roles[self.role].module(batch.latents, torch.full((len(batch),), 0.5), batch.cond)  # (B, C, T, H, W)
        self.seen.append({"autocast": torch.is_autocast_enabled(device), "dtype": torch.get_autocast_dtype(device),
                          "output": out.dtype})
        return self.output({"probe": out.float().pow(2).flatten(1).mean(1)})


def block_calls(trainer) -> list[int]:
    """Run one step of ``trainer``; how often each transformer block of the student ran forward."""
    blocks = trainer.roles["student"].module.backbone.module.blocks
    calls = [0] * len(blocks)

    def count(i):
        def hook(module, args):  # a pre-hook: recomputation may stop before the block's end
            calls[i] += 1
        return hook

    handles = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(blocks)]
    try:
        record = trainer.train_step()
    finally:
        for handle in handles:
            handle.remove()
    assert np.isfinite(record["loss/student"]) and record["lr/student"] > 0
    return calls


def test_bf16_and_gradient_checkpointing(teacher_dir, tmp_path):
    probe = ["stages.finetune.objectives.probe.kind=test_autocast_probe"]
    cfg = Finetune.load_config(None, [f"model={teacher_dir}", *TINY, *probe, "train.bf16=true",
                                      "train.gradient_checkpointing=true"])
    trainer = Trainer(Finetune(cfg), tmp_path / "run", DistEnv())
    assert trainer.roles["student"].module.backbone.module.gradient_checkpointing
    AutocastProbe.seen.clear()
    checkpointed = block_calls(trainer)
    # the objectives ran under bf16 autocast, and the student's matmuls with it
    assert AutocastProbe.seen and all(s == {"autocast": True, "dtype": torch.bfloat16, "output": torch.bfloat16}
                                      for s in AutocastProbe.seen)
    block_calls(trainer)
    assert trainer.roles["student"].updates == 2

    # checkpointing recomputes every block in the backward pass: twice the forward calls of a plain run
    cfg = Finetune.load_config(None, [f"model={teacher_dir}", *TINY, *probe, "train.bf16=false"])
    plain_trainer = Trainer(Finetune(cfg), tmp_path / "plain", DistEnv())
    AutocastProbe.seen.clear()
    plain = block_calls(plain_trainer)
    assert all(n > 0 for n in plain) and checkpointed == [2 * n for n in plain]
    assert AutocastProbe.seen[0] == {"autocast": False, "dtype": torch.bfloat16, "output": torch.float32}
    assert not (tmp_path / "run").exists()  # building and stepping write nothing


def test_optimizer_state_and_rng_round_trip(teacher_dir, tmp_path):
    cfg = Finetune.load_config(None, [f"model={teacher_dir}", *TINY])
    trainer = Trainer(Finetune(cfg), tmp_path / "run", DistEnv())
    trainer.train_step()
    role = trainer.roles["student"]
    state = full_optimizer_state(role.module, role.optimizer)
    tensors_, meta = flatten_optimizer_state(state)
    assert all("::" in k for k in tensors_) and "backbone.module.final_layer.linear.bias::exp_avg" in tensors_
    back = unflatten_optimizer_state(tensors_, json.loads(json.dumps(meta)))
    assert back["param_groups"][0]["betas"] == state["param_groups"][0]["betas"]
    for name, values in state["state"].items():
        for k, v in values.items():
            assert torch.equal(back["state"][name][k], v)

    saved = capture_rng()
    draws = torch.rand(3), np.random.rand(3), random.random()
    restore_rng(json.loads(json.dumps(saved)))
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


class StageHookRecipe(Finetune):
    """finetune with three stages whose start_stage hook records its calls."""

    name = "test_three_stages"
    calls: list[int] = []

    @classmethod
    def defaults_path(cls):
        return Finetune.defaults_path()

    def start_stage(self, index, roles):
        type(self).calls.append(index)


def test_three_stages_and_stage_hooks_on_resume(teacher_dir, tmp_path, capsys):
    from fewstep.recipes.base import RECIPES

    RECIPES.setdefault(StageHookRecipe.name, StageHookRecipe)
    three = ["stages.finetune.steps=1", "stages.b.steps=1", "stages.b.objectives.flow.kind=flow_matching",
             "stages.c.objectives.flow.kind=flow_matching", "stages.c.objectives.flow.weight=2.0"]
    rc, _, err = cli(capsys, "distill", "--recipe", StageHookRecipe.name, "--out", tmp_path / "run",
                     *sets(teacher_dir, *three, "train.steps=2"))
    assert rc == 0, err
    assert StageHookRecipe.calls == [0, 1]
    StageHookRecipe.calls.clear()
    rc, _, err = cli(capsys, "distill", "--resume", tmp_path / "run", "--set", "train.steps=3")
    assert rc == 0, err
    assert StageHookRecipe.calls == [0, 1, 2]  # replayed up to the checkpoint's stage, then the new one
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    stages = [json.loads(line)["stage"] for line in records]
    assert stages == ["finetune", "b", "c"]
