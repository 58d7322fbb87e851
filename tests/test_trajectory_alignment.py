"""SwiftVideo's trajectory alignment (papers/003, Eq. 11 + L_RF): the flow-DPO loss and its gradient, the
reflow term, the preference store (sharded, resumable, a manifest) written by ``fewstep pairs``, and the
``swiftvideo_ta`` recipe's LoRA run on the tiny toy teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fewstep.data.preferences import PreferenceStore
from fewstep.engine.lora import LoraConfig, add_lora, adapter_names, merge_adapters
from fewstep.errors import UserError
from fewstep.models.backbones import Conditioning
from fewstep.models.family import load_model
from fewstep.objectives.base import Batch
from fewstep.objectives.flow_matching import denoising_loss
from fewstep.objectives.preference import FlowDPO, FlowDPOConfig, flow_dpo_loss
from fewstep.synth import sample_noise, synthesize_pairs
from helpers import FakeRole, cli, losses, make_ctx, tensors, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_setup(beta=2500.0, reflow_weight=2.0):
    pipe, batch = tiny_setup(batch_size=2)
    g = torch.Generator().manual_seed(5)
    lose = batch.latents + 0.5 * torch.randn(batch.latents.shape, generator=g)
    cond, uncond = (Conditioning(c.context.detach(), c.mask) for c in (batch.cond, batch.uncond))  # no text graph
    batch = Batch(batch.latents, cond, uncond, batch.prompts, batch.sample_ids,
                  extra={"preferred": batch.latents, "dispreferred": lose})
    reference = pipe.denoiser.eval().requires_grad_(False)
    student = copy.deepcopy(reference).train().requires_grad_(True)
    roles = {"student": FakeRole("student", student), "reference": FakeRole("reference", reference, trainable=False)}
    return FlowDPO(FlowDPOConfig(beta=beta, reflow_weight=reflow_weight), "dpo"), roles, batch


def test_dpo_is_log2_when_the_student_is_the_reference():
    obj, roles, batch = dpo_setup()
    out = obj(batch, roles, make_ctx(2, step=1))
    torch.testing.assert_close(out.losses["dpo"], torch.full((2,), math.log(2.0)))
    assert out.metrics["win_diff"] == 0.0 and out.metrics["lose_diff"] == 0.0


def test_eq11_values():
    e_w, e_l = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1])
    e_w_ref, e_l_ref = torch.tensor([0.25, 0.4]), torch.tensor([0.3, 0.2])
    want = -torch.log(torch.sigmoid(-0.5 * 10.0 * ((e_w - e_w_ref) - (e_l - e_l_ref))))
    torch.testing.assert_close(flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=10.0), want)


def test_the_dpo_gradient_lowers_the_preferred_error_relative_to_the_dispreferred_one():
    """At θ = ref, ∇L_DPO = β/4·∇(e_w − e_l); a small step makes (e_w − e_w_ref) − (e_l − e_l_ref) negative."""
    beta = 2500.0
    obj, roles, batch = dpo_setup(beta=beta, reflow_weight=0.0)
    student = roles["student"].module
    ctx = make_ctx(2, step=1)
    out = obj(batch, roles, ctx)
    grads = torch.autograd.grad(out.losses["dpo"].mean(), list(student.parameters()))
    t = ctx.times(obj.distribution, "dpo/t").float()
    eps = ctx.randn(tuple(batch.latents.shape[1:]), "dpo/eps")
    e_w = denoising_loss(student, batch.extra["preferred"], t, eps, batch.cond)
    e_l = denoising_loss(student, batch.extra["dispreferred"], t, eps, batch.cond)
    want = torch.autograd.grad((beta / 4) * (e_w - e_l).mean(), list(student.parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)  # float32: one batched pass vs two
    with torch.no_grad():  # one SGD step on L_DPO
        for p, g in zip(student.parameters(), grads):
            p -= 1e-7 * g
    after = obj(batch, roles, ctx).metrics
    assert after["win_diff"] - after["lose_diff"] < 0, after


def test_reflow_is_flow_matching_on_the_preferred_samples():
    obj, roles, batch = dpo_setup(reflow_weight=2.0)
    perturbed = roles["student"].module
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ctx = make_ctx(2, step=4)
    out = obj(batch, roles, ctx)
    t = ctx.times(obj.distribution, "dpo/t").float()
    eps = ctx.randn(tuple(batch.latents.shape[1:]), "dpo/eps")
    fm = denoising_loss(perturbed, batch.extra["preferred"], t, eps, batch.cond)  # ‖v^w − v_θ(x_t^w, t)‖²
    torch.testing.assert_close(out.losses["reflow"], 2.0 * fm, rtol=1e-5, atol=1e-7)
    assert out.metrics["win_diff"] != 0.0


def test_lora_leaves_the_base_weights_untouched():
    obj, roles, batch = dpo_setup()
    student = roles["student"].module
    add_lora(student, LoraConfig(rank=4, alpha=4.0))
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert {n for n, p in student.named_parameters() if p.requires_grad} == set(adapter_names(student))
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for step in range(3):
        out = obj(batch, roles, make_ctx(2, step=step))
        opt.zero_grad()
        sum(v.mean() for v in out.losses.values()).backward()
        opt.step()
    for n, p in student.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert out.metrics["win_diff"] != 0.0  # the adapters moved the student


# ----------------------------------------------------------------------------------- the store
@pytest.fixture(scope="module")
def store_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    synthesize_pairs(teacher_dir, out, 5, preferred=4, dispreferred=2, batch_size=2, shard_size=2)
    return out


def test_pairs_are_the_model_at_two_step_counts_from_one_noise(store_dir, teacher_dir):
    store = PreferenceStore(store_dir)
    assert store.complete and len(store.manifest.shards) == 3 and store.settings.preferred == 4
    pipe = load_model(teacher_dir)
    items = store.pairs([3, 0])
    noise = sample_noise(pipe.latent_shape(1)[1:], 0, [3, 0])
    with torch.no_grad():
        win = pipe.sample_latents(items["prompts"], steps=4, noise=noise).x
        lose = pipe.sample_latents(items["prompts"], steps=2, noise=noise).x
    torch.testing.assert_close(items["preferred"], win)
    torch.testing.assert_close(items["dispreferred"], lose)
    assert not torch.allclose(win, lose)


def test_an_interrupted_store_resumes_bit_identically(store_dir, teacher_dir, tmp_path):
    import shutil

    copy_dir = tmp_path / "pairs"
    shutil.copytree(store_dir, copy_dir)
    last = copy_dir / "shard_00002.safetensors"
    want = last.read_bytes()
    last.unlink()
    (copy_dir / ".shard_00001.safetensors.tmp").write_bytes(b"partial")
    synthesize_pairs(teacher_dir, copy_dir, 5, preferred=4, dispreferred=2, batch_size=2, shard_size=2)
    assert last.read_bytes() == want and not list(copy_dir.glob(".*.tmp"))
    with pytest.raises(UserError, match="preference store made with dispreferred=2"):
        synthesize_pairs(teacher_dir, copy_dir, 5, preferred=4, dispreferred=1, batch_size=2, shard_size=2)
    with pytest.raises(UserError, match="more steps than the dispreferred"):
        synthesize_pairs(teacher_dir, tmp_path / "bad", 5, preferred=2, dispreferred=4)


def test_real_clips_as_preferred(teacher_dir, tmp_path):
    store = synthesize_pairs(teacher_dir, tmp_path / "real", 2, preferred="real", dispreferred=2)
    from fewstep.data.toyworld import ToyWorld

    pipe = load_model(teacher_dir)
    frames, size = pipe.geometry.frames, pipe.geometry.height
    with torch.no_grad():
        want = pipe.encode(ToyWorld("train", frames=frames, size=size, length=2**62).batch([0, 1])["frames"])
    torch.testing.assert_close(store.pairs([0, 1])["preferred"], want)


# ----------------------------------------------------------------------------------- the recipe
def test_the_ta_recipe_trains_lora_on_the_pairs(store_dir, teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"model={teacher_dir}", f"data.path={store_dir}", "train.steps=3", "train.batch_size=2",
            "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1", "train.tensorboard=false",
            "roles.student.lora.rank=4", "roles.student.optim.lr=1e-3", "roles.student.optim.warmup_steps=0"]
    rc, out, err = cli(capsys, "distill", "--recipe", "swiftvideo_ta", "--out", run,
                       *[a for s in sets for a in ("--set", s)])
    assert rc == 0, err
    seen = losses(run)
    assert sorted(seen) == [1, 2, 3] and {"loss/student/dpo/dpo", "loss/student/dpo/reflow"} <= set(seen[3])
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("metric/student/dpo/win_diff" in r for r in records)  # the paper's Win Diff
    adapters = tensors(run, 3)
    assert adapters and all(".lora_" in k for k in adapters)  # the checkpoint holds the adapters only
    student, base = load_model(run / "student").denoiser.state_dict(), load_model(teacher_dir).denoiser.state_dict()
    merged = merge_adapters(base, adapters, scale=16.0 / 4)  # W + (α / r)·B A, the base untouched
    for k, v in student.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    adapted = {k.split(".lora_")[0] + ".weight" for k in adapters}
    assert {k for k in base if not torch.equal(base[k], student[k])} <= adapted


def test_ta_presets(tmp_path, capsys):
    rc, out, err = cli(capsys, "distill", "--recipe", "swiftvideo_ta", "--out", tmp_path / "run", "--dry-run",
                       "--preset", "round2", "--preset", "no_reflow", "--preset", "consistency_sampler")
    assert rc == 0, err
    import yaml

    cfg = yaml.safe_load(out)
    assert cfg["generator"]["times"] == "uniform2" and cfg["data"]["path"] == "runs/swiftvideo_pairs2"
    assert cfg["generator"]["sampler"] == "consistency"
    assert cfg["stages"]["ta"]["objectives"]["dpo"]["reflow_weight"] == 0.0
    assert cfg["roles"]["student"]["lora"]["rank"] == 16 and cfg["roles"]["reference"]["optim"] is None
