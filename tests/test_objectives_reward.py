"""Latent reward models (DOLLAR Eq. 14–15, App. 7.2) and the DDPO baseline (DOLLAR App. 7.4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from einops import rearrange
from scipy.stats import norm
from torch import nn

from fewstep.diffusion.schedules import VPDiscrete
from fewstep.errors import UserError
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.ddpo import DDPO, normalize_advantages
from fewstep.objectives.reward import LRMFinetune, LRMFit
from fewstep.objectives.student import student_sample
from fewstep.rewards.base import Reward
from fewstep.rewards.latent import ImageLRM, LatentRewardModelConfig, build_lrm
from helpers import F64, FakeRole, GaussianX0, engine_config, make_batch, make_ctx, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_LRM = LatentRewardModelConfig(width=32, groups=4, kernel_size=3, stride=1)


class ChannelMean(Reward):
    """A known reward: the mean of colour channel 0 (with :func:`as_frames`, the mean of latent channel 0)."""

    def reward(self, frames, prompts=None):
        return frames[..., 0].flatten(1).mean(1)


def as_frames(latents):
    """A stand-in decoder: latent channels 0–2 as RGB, (B, C, T, H, W) → (B, T, H, W, 3)."""
    return rearrange(latents[:, :3], "b c t h w -> b t h w c")


def never_decode(latents):
    raise AssertionError("the decoder must not be used")


def gaussian_student(schedule, m=0.5, s=1.0, dtype=torch.float32):
    return Denoiser(GaussianX0(schedule, torch.tensor(m, dtype=dtype), s), schedule, "x0")


# ---------------------------------------------------------------------------------------------
# Latent reward models
# ---------------------------------------------------------------------------------------------

def test_image_lrm_is_table_12():
    lrm = ImageLRM(12)  # CogVideoX-style latents: Table 12's 189,441 parameters
    assert sum(p.numel() for p in lrm.parameters()) == 189_441
    assert lrm(torch.randn(2, 12, 24, 40)).shape == (2,)  # (B, C, H, W) → (B,), via (B, 128, 6, 10) and (B, 128, 3, 5)


@pytest.mark.parametrize("text, temporal", [(False, "average"), (True, "average"), (False, "conv3d"), (True, "conv3d")])
def test_video_lrms_score_latent_videos(text, temporal):
    pipe, batch = tiny_setup(2)
    c = batch.latents.shape[1]
    lrm = build_lrm(TINY_LRM.model_copy(update={"text": text, "temporal": temporal}), c,
                    text_dim=batch.cond.context.shape[-1])
    out = lrm(batch.latents, batch.cond)
    assert out.shape == (2,) and bool(torch.isfinite(out).all())
    if text:  # the caption changes the score
        other = pipe.encode_prompts(["a green triangle moves right"] * 2)
        assert not torch.allclose(out, lrm(batch.latents, other))


def test_lrm_fit_regresses_a_known_reward():
    torch.manual_seed(0)
    lrm = build_lrm(TINY_LRM, in_channels=4)
    sched = VPDiscrete()
    roles = {"lrm": FakeRole("lrm", lrm), "student": FakeRole("student", gaussian_student(sched))}
    objective = LRMFit(LRMFit.Config(reward="sharpness"), "lrm")
    objective.decoder, objective.reward_model = as_frames, ChannelMean()
    optim = torch.optim.Adam(lrm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def data(b):  # per-sample channel offsets give the reward a spread
        return torch.randn(b, 4, 2, 4, 4, generator=g) + torch.randn(b, 4, 1, 1, 1, generator=g)

    for step in range(200):
        batch = make_batch(data(16))
        out = objective(batch, roles, make_ctx(16, role="lrm", step=step))
        loss = sum(v.mean() for v in out.losses.values())
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert set(out.losses) == {"mse"} and {"mse_real", "mse_generated"} <= set(out.metrics)
    x = data(256)
    with torch.no_grad():
        r, r_hat = ChannelMean()(as_frames(x)), lrm(x)
    assert float((r_hat - r).pow(2).mean()) < 0.05 * float(r.var())


def test_lrm_fit_on_student_samples_scores_the_latents_the_finetune_differentiates():
    sched = VPDiscrete()
    student = gaussian_student(sched, dtype=F64)
    lrm = build_lrm(TINY_LRM, in_channels=4).double()
    roles = {"lrm": FakeRole("lrm", lrm), "student": FakeRole("student", student)}
    objective = LRMFit(LRMFit.Config(reward="sharpness", real=False, generated_from="sample"), "lrm")
    objective.decoder, objective.reward_model = as_frames, ChannelMean()
    batch = make_batch(torch.zeros(3, 4, 2, 4, 4, dtype=F64))
    out = objective(batch, roles, make_ctx(3, role="lrm", step=7, times="dollar2"))
    # G(ε) with the noise the student's own objectives draw at step 7
    x = student_sample(student, batch, make_ctx(3, role="student", step=7, times="dollar2")).x0
    np.testing.assert_allclose(out.metrics["reward_generated"], float(ChannelMean()(as_frames(x)).mean()), rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(out.metrics["lrm_generated"], float(lrm(x).mean()), rtol=1e-6)


def test_lrm_fit_works_with_the_non_differentiable_jpeg_reward():
    pipe, batch = tiny_setup(4)
    torch.manual_seed(0)
    lrm = build_lrm(TINY_LRM, in_channels=batch.latents.shape[1])
    student = copy.deepcopy(pipe.denoiser)
    roles = {"lrm": FakeRole("lrm", lrm), "student": FakeRole("student", student)}
    # the data latents alone (the one-step x̂0 of the generated set changes every step), so the four
    # rewards can be fitted exactly; the loss is in units of the rewards' spread (1 = predicting μ)
    objective = LRMFit(LRMFit.Config(reward="jpeg", reward_kwargs={"quality": 90}, generated=False), "lrm")
    objective.decoder = pipe.decode  # the recipe assigns the codec of the model being distilled
    optim = torch.optim.Adam(lrm.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        out = objective(batch, roles, make_ctx(4, role="lrm", step=step))
        loss = sum(v.mean() for v in out.losses.values())
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert not objective.reward_model.differentiable
    assert out.metrics["reward_real"] < 0  # −kB per frame
    assert np.mean(losses[-5:]) < 0.05
    r = objective.pixel_reward(batch.latents, batch.prompts)
    np.testing.assert_allclose(float(lrm.reward_mean), float(r.mean()), rtol=1e-4)  # μ, σ² of a fixed batch
    np.testing.assert_allclose(float(lrm.reward_var), float(r.var(unbiased=False)), rtol=1e-3)
    with torch.no_grad():  # R^l answers in the reward's units
        assert float((lrm(batch.latents, batch.cond) - r).pow(2).mean()) < 0.05 * float(r.var(unbiased=False))


def test_lrm_finetune_gradient_reaches_the_student_only():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    torch.manual_seed(0)
    lrm = build_lrm(TINY_LRM.model_copy(update={"text": True}), batch.latents.shape[1],
                    text_dim=batch.cond.context.shape[-1])
    roles = {"student": FakeRole("student", student), "lrm": FakeRole("lrm", lrm)}
    objective = LRMFinetune(LRMFinetune.Config(), "ft")
    objective.decoder = never_decode  # not used: the fine-tune needs neither decoder nor pixel reward
    ctx = make_ctx(2, times="dollar2")
    loss = objective(batch, roles, ctx).losses["ft"]
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss.mean(), params, allow_unused=True)
    assert all(p.grad is None for p in lrm.parameters())
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0

    # the same value and student gradient as differentiating −R^l(G(ε)) directly
    x_hat = student_sample(student, batch, ctx).x0
    direct = -lrm(x_hat, batch.cond)
    torch.testing.assert_close(loss.detach(), direct.detach())
    direct_grads = torch.autograd.grad(direct.mean(), params, allow_unused=True)
    for a, b in zip(grads, direct_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_lrm_reward_statistics_are_the_exponentially_weighted_mean_and_variance():
    lrm = build_lrm(TINY_LRM, in_channels=4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, generator=g, dtype=F64) * 0.05 - 0.3 + 0.02 * k for k in range(30)]
    m = 0.9
    for r in batches:
        lrm.update_statistics(r, m)
    # the weights of an EMA whose first value is the first batch: w_0 = m^(K−1), w_k = (1 − m)·m^(K−1−k)
    k = len(batches)
    w = torch.tensor([m ** (k - 1)] + [(1 - m) * m ** (k - 1 - i) for i in range(1, k)], dtype=F64)
    values = torch.stack(batches)  # (K, 6)
    mean = float((w[:, None] * values).sum() / 6)
    var = float((w[:, None] * (values - mean) ** 2).sum() / 6)
    np.testing.assert_allclose(float(lrm.reward_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(float(lrm.reward_var), var, rtol=1e-3)
    assert int(lrm.reward_updates) == k


def test_lrm_finetune_standardized_is_eq15_divided_by_sigma():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    torch.manual_seed(0)
    lrm = build_lrm(TINY_LRM, batch.latents.shape[1])
    lrm.update_statistics(torch.tensor([-0.30, -0.26, -0.37]), 0.99)
    mu, sigma = float(lrm.reward_mean), float(lrm.reward_std)
    roles = {"student": FakeRole("student", student), "lrm": FakeRole("lrm", lrm)}
    params = [p for p in student.parameters() if p.requires_grad]
    ctx = make_ctx(2, times="dollar2")
    out = {}
    for standardized in (True, False):
        objective = LRMFinetune(LRMFinetune.Config(standardized=standardized), "ft")
        result = objective(batch, roles, ctx)
        loss = result.losses["ft"]
        out[standardized] = (loss.detach(), torch.autograd.grad(loss.mean(), params, allow_unused=True),
                             result.metrics["lrm_reward"])
    (z_loss, z_grads, z_reward), (r_loss, r_grads, r_reward) = out[True], out[False]
    torch.testing.assert_close(z_loss, (r_loss + mu) / sigma)  # −z = −(R^l − μ)/σ
    np.testing.assert_allclose(z_reward, r_reward, rtol=1e-5)  # the metric is in reward units either way
    for a, b in zip(z_grads, r_grads):
        if a is not None:
            torch.testing.assert_close(a, b / sigma, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# DDPO
# ---------------------------------------------------------------------------------------------

def test_ddpo_log_probability_is_the_eq27_gaussian_density():
    sched = VPDiscrete()
    m = nn.Parameter(torch.tensor(0.5, dtype=F64))
    student = Denoiser(GaussianX0(sched, m, 0.8), sched, "x0")
    b, shape = 3, (1, 1, 2, 2)
    batch = make_batch(torch.zeros(b, *shape, dtype=F64))
    objective = DDPO(DDPO.Config(eta=1.0), "ddpo")
    roll = objective.rollout(student, batch, make_ctx(b))
    assert roll.steps == [1, 2]  # the last two stochastic transitions: 749 → 499 and 499 → 249
    assert len(roll.log_probs) == 2 and all(lp.requires_grad for lp in roll.log_probs)
    abar = sched.alphas_cumprod.double()
    ks = [999, 749, 499, 249]
    for lp, i in zip(roll.log_probs, roll.steps):
        a_t, a_s = abar[ks[i]], abar[ks[i + 1]]
        x_t, x_s = roll.states[i].numpy(), roll.states[i + 1].numpy()
        x0_hat = 0.5 + a_t.sqrt().item() * 0.64 / (a_t.item() * 0.64 + 1 - a_t.item()) * (x_t - a_t.sqrt().item() * 0.5)
        beta = (1 - a_t / a_s).item()  # DOLLAR Eq. 27 for the jump t → s
        mean = (a_s.sqrt().item() * beta / (1 - a_t.item())) * x0_hat \
            + ((a_t / a_s).sqrt().item() * (1 - a_s.item()) / (1 - a_t.item())) * x_t
        std = (beta * (1 - a_s.item()) / (1 - a_t.item())) ** 0.5
        expected = norm.logpdf(x_s, loc=mean, scale=std).reshape(b, -1).sum(1)
        np.testing.assert_allclose(lp.detach().numpy(), expected, rtol=1e-6)


def test_ddpo_policy_gradient_increases_the_expected_reward():
    """1-D toy: the student's data mean m is the policy parameter; the reward is the sample itself."""
    sched = VPDiscrete()
    m = nn.Parameter(torch.tensor(0.0, dtype=F64))
    student = Denoiser(GaussianX0(sched, m, 0.5), sched, "x0")
    roles = {"student": FakeRole("student", student)}
    objective = DDPO(DDPO.Config(reward="jpeg"), "ddpo")
    objective.decoder = lambda z: z.reshape(-1, 1, 1, 1, 1).expand(-1, 1, 1, 1, 3)  # (B, 1, 1, 1, 3)
    objective.reward_model = ChannelMean()

    def expected_reward():
        with torch.no_grad():
            batch = make_batch(torch.zeros(2048, 1, 1, 1, 1, dtype=F64))
            return float(objective.rollout(student, batch, make_ctx(2048, step=10_000)).x.mean())

    before = expected_reward()
    optim = torch.optim.SGD([m], lr=0.2)
    for step in range(5):
        batch = make_batch(torch.zeros(128, 1, 1, 1, 1, dtype=F64))
        loss = objective(batch, roles, make_ctx(128, step=step)).losses["ddpo"]
        optim.zero_grad()
        loss.mean().backward()
        optim.step()
    assert float(m.detach()) > 0.3
    assert expected_reward() > before + 0.3


def test_advantages_are_normalised_per_prompt_with_a_batch_fallback():
    r = torch.tensor([1.0, 3.0, 5.0, 10.0])
    adv = normalize_advantages(r, ["a", "a", "b", "c"], per_prompt=True)
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    batch = (r - r.mean()) / r.std(unbiased=False)
    torch.testing.assert_close(adv[2:], batch[2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_advantages(r, ["a"] * 4, per_prompt=False), batch, atol=1e-5, rtol=0)


def test_ddpo_on_the_toy_backbone():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    objective = DDPO(DDPO.Config(), "ddpo")
    objective.decoder = pipe.decode  # JPEG compressibility of the decoded frames
    loss = objective(batch, {"student": FakeRole("student", student)}, make_ctx(2)).losses["ddpo"]
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def test_reward_objectives_are_listed_in_a_stage_by_kind():
    cfg = engine_config({"student": True, "lrm": True}, {
        "lrm": {"kind": "lrm_fit", "reward": "jpeg", "decoder": "toy-teacher"},
        "ft": {"kind": "lrm_finetune", "weight": 1.0},
        "ddpo": {"kind": "ddpo", "reward": "sharpness", "truncation": 2, "eta": 1.0},
    })
    objectives = cfg.stages["main"].objectives
    assert objectives["lrm"].role == "lrm" and objectives["lrm"].reads() == {"student"}
    assert objectives["ft"].reads() == {"lrm"}
    with pytest.raises(UserError, match="reward"):
        engine_config({"student": True, "lrm": True}, {"lrm": {"kind": "lrm_fit", "reward": "pickscore"}})
    objective = LRMFit(LRMFit.Config(generated=False), "lrm")
    with pytest.raises(UserError, match="decoder"):
        objective(make_batch(torch.zeros(1, 4, 1, 2, 2)), {"lrm": FakeRole("lrm", build_lrm(TINY_LRM, 4))},
                  make_ctx(1, role="lrm"))



def test_lrm_objectives_train_in_the_engine(teacher_dir, tmp_path):
    """What a DOLLAR recipe adds to PipelineRecipe: an ``lrm`` role built with build_lrm."""
    from fewstep.engine.distributed import DistEnv
    from fewstep.engine.trainer import Trainer
    from fewstep.recipes.base import recipe_class
    Finetune = recipe_class("finetune")

    class WithLRM(Finetune):  # any recipe builds an lrm role from its `build:` (recipes/builders.py)
        pass

    base = {
        "model": str(teacher_dir),
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "tensorboard": False},
        "roles": {"student": {"optim": {"lr": 1e-4}},
                  "lrm": {"build": {"kind": "lrm", **TINY_LRM.model_dump()}, "optim": {"lr": 1e-3}}},
        "stages": {"main": {"objectives": {
            "lrm": {"kind": "lrm_fit", "reward": "jpeg", "decoder": str(teacher_dir)},
            "ft": {"kind": "lrm_finetune"},
        }}},
        "generator": {"times": [999, 499]},
    }
    trainer = Trainer(WithLRM(WithLRM.load_config(None, [], base=base)), tmp_path / "run", DistEnv())
    for _ in range(2):
        record = trainer.train_step()
    assert np.isfinite(record["loss/lrm/lrm/mse"]) and np.isfinite(record["loss/student/ft/ft"])
    assert trainer.roles["lrm"].updates == 2 and trainer.roles["student"].updates == 2


def test_a_pixel_reward_objective_without_a_decoder_is_a_one_line_error():
    _, batch = tiny_setup(2)
    objective = LRMFit(LRMFit.Config(reward="sharpness"), "lrm")
    with pytest.raises(UserError, match="has no decoder: set its 'decoder' key"):
        objective.pixel_reward(batch.latents, batch.prompts)
