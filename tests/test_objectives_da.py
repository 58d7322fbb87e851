"""SwiftVideo's distribution alignment (papers/003, Eq. 10): hinge values, x̂0, where gradients go, the
discriminator on the toy CLIP's frame encoder and on a tiny random DINOv2 loaded from a directory."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from fewstep.diffusion.schedules import FlowMatching
from fewstep.errors import UserError
from fewstep.objectives.distribution_alignment import (AlignmentDiscriminator, AlignmentDiscriminatorConfig,
                                                       AlignmentGenerator, AlignmentGeneratorConfig,
                                                       FeatureDiscriminatorConfig, build_feature_discriminator,
                                                       hinge_discriminator_loss_eq10, hinge_generator_loss_eq10)
from fewstep.recipes.builders import parse_build
from helpers import FakeRole, make_ctx, make_tiny_dinov2, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def as_frames(latents):
    """A stand-in decoder: latent channels 0–2 as RGB, (B, C, T, H, W) → (B, T, H, W, 3)."""
    return rearrange(latents[:, :3], "b c t h w -> b t h w c").tanh()


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2")


def setup(disc=None, shift=3.0):
    pipe, batch = tiny_setup(batch_size=2)
    pipe.denoiser.schedule = FlowMatching(shift=shift)
    student = copy.deepcopy(pipe.denoiser).train().requires_grad_(True)
    disc = disc or build_feature_discriminator(FeatureDiscriminatorConfig(width=8))  # the shipped toy CLIP
    roles = {"student": FakeRole("student", student), "discriminator": FakeRole("discriminator", disc.train())}
    gen, dis = AlignmentGenerator(AlignmentGeneratorConfig(), "da_g"), AlignmentDiscriminator(
        AlignmentDiscriminatorConfig(), "da_d")
    gen.decoder = dis.decoder = as_frames
    return roles, batch, gen, dis


def test_hinge_values_match_eq10():
    d_real = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    d_fake = torch.tensor([[-2.0, 0.5, 1.0], [-0.5, -1.0, 0.0]])
    # L^D = Σ_k max(0, 1 − d_real) + max(0, 1 + d_fake)
    want_d = torch.tensor([(0 + 0.5 + 2.0) + (0 + 1.5 + 2.0), (1.0 + 0 + 0) + (0.5 + 0 + 1.0)])
    torch.testing.assert_close(hinge_discriminator_loss_eq10(d_real, d_fake), want_d)
    # L^G's term = Σ_k max(0, 1 − d_fake)
    torch.testing.assert_close(hinge_generator_loss_eq10(d_fake), torch.tensor([3.0 + 0.5 + 0.0, 1.5 + 2.0 + 1.0]))


def test_the_fake_is_the_one_step_prediction_and_both_objectives_share_it():
    """x̂0 = x_t − t·F_θ(x_t, t) with t the paper's σ; the discriminator regenerates the generator's x̂0."""
    roles, batch, gen, dis = setup()
    ctx = make_ctx(2, step=3)
    x_hat = gen.one_step(batch, roles, ctx)
    sigma = ctx.times(gen.distribution, "da/t").float()
    eps = ctx.randn(tuple(batch.latents.shape[1:]), "da/eps")
    s = sigma.reshape(-1, 1, 1, 1, 1)
    x_t = (1 - s) * batch.latents + s * eps
    student = roles["student"].module
    manual = x_t - s * student.predict(x_t, FlowMatching(3.0).unshift(sigma), batch.cond).flow
    torch.testing.assert_close(x_hat, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dis.one_step(batch, roles, make_ctx(2, step=3, role="discriminator")), x_hat)


def test_gradients_go_where_eq10_sends_them():
    roles, batch, gen, dis = setup()
    student, disc = roles["student"].module, roles["discriminator"].module
    out = gen(batch, roles, make_ctx(2, step=1))
    assert out.losses["adv"].shape == (2,)
    out.losses["adv"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in disc.parameters())  # heads enter as a fixed function; features frozen
    student.zero_grad(set_to_none=True)
    out = dis(batch, roles, make_ctx(2, step=1, role="discriminator"))
    out.losses["adv"].mean().backward()
    assert all(p.grad is None for p in student.parameters())
    heads = [p for n, p in disc.named_parameters() if not n.startswith("features.")]
    assert all(p.grad is not None for p in heads)
    assert all(not p.requires_grad and p.grad is None for p in disc.features.parameters())


def test_toy_clip_discriminator_heads_and_frozen_features():
    disc = parse_build({"kind": "feature_discriminator", "features": "toy_clip", "width": 8}, "discriminator").build(None)
    assert disc.features.channels == [16, 32, 64]  # the toy CLIP's three conv stages
    assert len(disc.spatial) == len(disc.temporal) == 3
    disc.train()
    assert not disc.features.training and disc.spatial.training
    frames = torch.rand(2, 8, 16, 16, 3) * 2 - 1
    assert disc(frames).shape == (2, 6)  # K = spatial + temporal heads
    only_spatial = build_feature_discriminator(FeatureDiscriminatorConfig(temporal=False, layers=[-1], frames=4))
    assert only_spatial(frames).shape == (2, 1)


def test_dinov2_discriminator_from_a_local_directory(dinov2_dir):
    disc = parse_build({"kind": "feature_discriminator", "features": "dinov2", "path": str(dinov2_dir),
                        "layers": [0, 1], "size": 16, "width": 8}, "discriminator").build(None)
    assert disc.features.channels == [16, 16]
    frames = (torch.rand(2, 3, 24, 40, 3) * 2 - 1).requires_grad_(True)  # not square: scaled, not cropped
    logits = disc(frames)
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0  # the generator's path through DINOv2
    roles, batch, gen, dis = setup(disc=disc)
    out = gen(batch, roles, make_ctx(2, step=1))
    assert torch.isfinite(out.losses["adv"]).all()


def test_bad_feature_configs_are_one_line_errors(dinov2_dir, tmp_path):
    with pytest.raises(UserError, match="needs path"):
        parse_build({"kind": "feature_discriminator", "features": "dinov2"}, "discriminator")
    with pytest.raises(UserError, match="out of range"):
        parse_build({"kind": "feature_discriminator", "features": "dinov2", "path": str(dinov2_dir), "layers": [5]},
                    "discriminator").build(None)
    with pytest.raises(UserError, match="no such directory"):
        parse_build({"kind": "feature_discriminator", "features": "dinov2", "path": str(tmp_path / "none")},
                    "discriminator").build(None)


def test_the_heads_learn_to_tell_real_from_one_step_predictions():
    """A few discriminator steps on one batch: real logits rise above fake ones (hinge margins)."""
    roles, batch, gen, dis = setup()
    disc = roles["discriminator"].module
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-2)
    ctx = make_ctx(2, step=0, role="discriminator")
    for _ in range(60):
        out = dis(batch, roles, ctx)
        opt.zero_grad()
        out.losses["adv"].mean().backward()
        opt.step()
    assert out.metrics["d_real"] > out.metrics["d_fake"] + 0.5, out.metrics


def test_denoiser_features_read_latents_and_skip_the_decoder():
    """features: denoiser — a frozen copy of the model's denoiser at t = 0 on latents (no decoding); gradients
    reach the latents (the generator's path) but not the frozen copy, whose weights stay the model's."""
    pipe, batch = tiny_setup(batch_size=2)
    disc = parse_build({"kind": "feature_discriminator", "features": "denoiser", "width": 8},
                       "discriminator").build(pipe)
    assert disc.space == "latent" and disc.features.denoiser is not pipe.denoiser
    latents = batch.latents.clone().requires_grad_(True)
    logits = disc(latents, batch.cond)
    assert logits.shape == (2, 2)  # one spatial + one temporal head on the 2/3-depth block
    logits.sum().backward()
    assert latents.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in disc.features.parameters())
    for mine, theirs in zip(disc.features.denoiser.state_dict().values(), pipe.denoiser.state_dict().values()):
        torch.testing.assert_close(mine, theirs)
    roles, batch, gen, dis = setup(disc=disc)
    gen.decoder = dis.decoder = None  # a latent discriminator never decodes
    out = gen(batch, roles, make_ctx(2, step=1))
    assert torch.isfinite(out.losses["adv"]).all()
    out = dis(batch, roles, make_ctx(2, step=1, role="discriminator"))
    assert torch.isfinite(out.losses["adv"]).all()
    with pytest.raises(UserError, match="out of range"):
        parse_build({"kind": "feature_discriminator", "features": "denoiser", "layers": [9]},
                    "discriminator").build(pipe)
