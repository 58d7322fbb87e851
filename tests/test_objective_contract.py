"""The objective contract (``fewstep.objectives.base``, STYLE §3 and §10), checked for EVERY registered
objective kind on the toy DiT and on a tiny diffusers Wan transformer:

* every loss term is finite and per sample, shape ``(B,)``;
* gradients reach the role the objective trains (some nonzero ``.grad``) and no other role — neither
  the frozen teacher nor the other trainable roles it reads (their parameters keep ``.grad is None``);
* the same StepContext (same seed, step and sample ids) gives the same losses.

Roles are built from the config alone (its ``role`` and ``reads()``); what a kind needs beyond that
(a config override, a decoder, trajectory extras in the batch) is in :data:`EXTRAS`. A newly
registered kind is run with the defaults; if it needs more, the failure says what to add.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import pytest
import torch
from einops import rearrange
from torch import nn

import fewstep.objectives as objectives_package
from fewstep.objectives.adversarial import TimestepHeads
from fewstep.objectives.base import OBJECTIVES, Batch, Objective
from fewstep.objectives.feature_gan import FeatureHeads
from fewstep.diffusion.schedules import TIME_GRIDS
from fewstep.rewards.base import Reward
from fewstep.rewards.latent import LatentRewardModelConfig, build_lrm
from helpers import FakeRole, make_ctx, make_tiny_pipeline, make_wan

pytestmark = pytest.mark.usefixtures("one_thread")

for _info in pkgutil.iter_modules(objectives_package.__path__):  # every kind registers itself on import
    importlib.import_module(f"{objectives_package.__name__}.{_info.name}")

KINDS = sorted(k for k, cls in OBJECTIVES.items() if cls.__module__.startswith("fewstep."))  # not tests' own kinds
PROMPTS = ["a red circle moves left", "a blue square moves up"]
TRAINABLE = {"student", "fake_score", "discriminator", "lrm"}  # the rest (teacher, reference) are frozen


# ---------------------------------------------------------------------------------------------
# What a kind needs beyond its roles: a short, explicit table
# ---------------------------------------------------------------------------------------------

def as_frames(latents):
    """A stand-in decoder: latent channels 0–2 as RGB, (B, C, T, H, W) → (B, T, H, W, 3)."""
    return rearrange(latents[:, :3], "b c t h w -> b t h w c").tanh()


def key_trajectories(latents):
    """Batch extras of a trajectory store: random paths at AccVideo's key times (decreasing)."""
    g = torch.Generator().manual_seed(7)
    b = latents.shape[0]
    times = torch.tensor(TIME_GRIDS["accvideo_keys"], dtype=torch.float64)  # (K,)
    path = torch.randn(b, len(times), *latents.shape[1:], generator=g)  # (B, K, C, T, H, W)
    return {"trajectory": path, "key_times": times.expand(b, -1)}


class FrameMean(Reward):
    """A stand-in reward with a parameter (it must get no gradient): a scaled mean of colour channel 0."""

    differentiable = True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def reward(self, frames, prompts=None):
        return self.scale * frames[..., 0].flatten(1).mean(1)


@dataclass
class Extras:
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the kind's config defaults
    decoder: bool = False  # assign the stand-in decoder (objectives that decode latents)
    batch: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None  # latents -> batch.extra
    generator: dict[str, Any] = field(default_factory=dict)  # the run's generator: block (make_ctx keys)
    family_roles: dict[str, Callable[["Family"], nn.Module]] = field(default_factory=dict)  # as roles, per family
    roles: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)  # modules for roles the defaults do not fit


PIXEL_REWARD = Extras(config={"reward": "sharpness"}, decoder=True)
STORE = Extras(batch=key_trajectories, generator={"sampler": "euler", "times": "accvideo_keys"})
FEATURE_HEADS = {"discriminator": lambda family: FeatureHeads(family.hidden, blocks=[0, -1], width=8)}
REWARD_ROLES = {name: lambda family: FrameMean()
                for name in ("reward_image_text", "reward_image_quality", "reward_video_text")}
EXTRAS: dict[str, Extras] = {
    "feature_gan_generator": Extras(family_roles=FEATURE_HEADS),
    "feature_gan_discriminator": Extras(family_roles=FEATURE_HEADS),
    "spatial_reward": Extras(decoder=True, family_roles=REWARD_ROLES),
    "temporal_reward": Extras(decoder=True, family_roles=REWARD_ROLES),
    "lrm_fit": PIXEL_REWARD,
    "ddpo": PIXEL_REWARD,
    "trajectory_guidance": STORE,
    "queue_gan_generator": STORE,
    "queue_gan_discriminator": STORE,
    "ccd": Extras(config={"warmup_steps": 0}),  # r = 1 from step 0: a student equal to its teacher still has a tangent
}


def tiny_feature_discriminator() -> nn.Module:
    """SwiftVideo's DA discriminator on a tiny random toy-CLIP frame encoder (objectives/distribution_alignment.py)."""
    from fewstep.data.toyworld import VOCAB
    from fewstep.models.text_encoder import ToyTextEncoderConfig
    from fewstep.objectives.distribution_alignment import FeatureDiscriminator
    from fewstep.rewards.toy_clip import ToyClipFrames
    from fewstep.rewards.toy_clip import ToyClip, ToyClipConfig

    clip = ToyClip(ToyClipConfig(size=16, channels=[8, 16], blocks=[0, 0], keypoints=2, frame_dim=16, temporal_dim=16,
                                 embed_dim=8, text=ToyTextEncoderConfig(vocab=VOCAB, dim=8, depth=1, heads=2)))
    return FeatureDiscriminator(ToyClipFrames(clip), width=8)


DA = Extras(decoder=True, roles={"discriminator": tiny_feature_discriminator})
EXTRAS |= {"da_generator": DA, "da_discriminator": DA}


def preference_pairs(latents):
    """Batch extras of a preference store: the latents as preferred, a perturbed copy as dispreferred."""
    g = torch.Generator().manual_seed(9)
    return {"preferred": latents, "dispreferred": latents + torch.randn(latents.shape, generator=g)}


EXTRAS["flow_dpo"] = Extras(batch=preference_pairs)


# ---------------------------------------------------------------------------------------------
# Backbones and roles
# ---------------------------------------------------------------------------------------------

@dataclass
class Family:
    teacher: Callable[[], nn.Module]  # a Denoiser
    latent: tuple[int, int, int, int]  # (C, T, H, W)
    hidden: int  # width of its block tokens (the discriminator heads' channels)


FAMILIES = {"toy": Family(lambda: make_tiny_pipeline().denoiser, latent=(4, 4, 4, 4), hidden=32),
            "wan": Family(make_wan, latent=(4, 2, 4, 4), hidden=16)}


def build_role(name: str, teacher: nn.Module, family: Family, custom: Callable[[], nn.Module] | None = None) -> FakeRole:
    if custom is not None:
        torch.manual_seed(3)
        module = custom()
    elif name == "discriminator":
        torch.manual_seed(1)
        module = TimestepHeads(channels=family.hidden, timesteps=len(TIME_GRIDS["accvideo_keys"]) - 1, width=8)
    elif name == "lrm":
        torch.manual_seed(2)
        module = build_lrm(LatentRewardModelConfig(width=8, groups=4, kernel_size=3, stride=1), in_channels=4,
                           text_dim=16)
    else:  # student, fake_score, reference: copies of the teacher, as recipes build them
        module = teacher if name == "teacher" else copy.deepcopy(teacher)
    if name in TRAINABLE:
        module.train().requires_grad_(True)
    else:
        module.eval().requires_grad_(False)
    return FakeRole(name, module, trainable=name in TRAINABLE)


def setup(kind: str, family_name: str) -> tuple[Objective, dict[str, FakeRole], Batch]:
    extras = EXTRAS.get(kind, Extras())
    cls = OBJECTIVES[kind]
    config = cls.Config(kind=kind, **extras.config)
    family = FAMILIES[family_name]
    teacher = family.teacher()
    custom = {**extras.roles, **{name: partial(make, family) for name, make in extras.family_roles.items()}}
    roles = {name: build_role(name, teacher, family, custom.get(name))
             for name in sorted({config.role, *config.reads()})}

    pipe = make_tiny_pipeline()  # its text encoder gives 16-wide captions, as both families take
    latents = torch.randn(len(PROMPTS), *family.latent, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    batch = Batch(latents=latents, cond=pipe.encode_prompts(PROMPTS), uncond=pipe.null_condition(len(PROMPTS)),
                  prompts=list(PROMPTS), sample_ids=torch.arange(len(PROMPTS)),
                  extra=extras.batch(latents) if extras.batch else {})
    return objective_for(cls, config, extras), roles, batch


def objective_for(cls, config, extras: Extras) -> Objective:
    objective = cls(config, config.kind)
    if extras.decoder:
        objective.decoder = as_frames
    return objective


# ---------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------

def run(objective: Objective, roles, batch):
    ctx = make_ctx(len(batch), role=objective.role, seed=3, **EXTRAS.get(objective.config.kind, Extras()).generator)
    try:
        return objective(batch, roles, ctx)
    except Exception as err:  # a new kind that needs more than the defaults
        raise AssertionError(f"objective kind {objective.config.kind!r} failed with its default roles and batch "
                             f"({type(err).__name__}: {err}); if it needs a config override, a decoder or batch "
                             f"extras, add an entry for it to EXTRAS in {__file__}") from err


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_objective_contract(kind, family):
    objective, roles, batch = setup(kind, family)
    pristine = {name: copy.deepcopy(role) for name, role in roles.items()}
    out = run(objective, roles, batch)

    # one finite loss per sample, for the role the config names
    assert out.role == objective.config.role and out.losses, kind
    for term, loss in out.losses.items():
        assert loss.shape == (len(batch),), f"{kind}/{term}: expected ({len(batch)},), got {tuple(loss.shape)}"
        assert bool(torch.isfinite(loss).all()), f"{kind}/{term}: {loss}"

    # gradients reach the trained role and no other
    sum(loss.float().mean() for loss in out.losses.values()).backward()
    trained = roles[out.role].module
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained.parameters()), \
        f"{kind}: no gradient reached the role it trains ({out.role})"
    for name, role in roles.items():
        if name != out.role:
            touched = [n for n, p in role.module.named_parameters() if p.grad is not None]
            assert not touched, f"{kind}: gradients leaked into role {name!r} ({touched[:3]} …)"

    # deterministic under a seed: a fresh objective on the same weights, the same context
    again = run(objective_for(type(objective), objective.config, EXTRAS.get(kind, Extras())), pristine, batch)
    for term, loss in out.losses.items():
        assert torch.equal(again.losses[term].detach(), loss.detach()), f"{kind}/{term}: not reproducible"


def test_every_kind_is_covered():
    """The parametrisation above is the registry itself; the table only names kinds that exist."""
    assert {"vsd", "fake_score", "cd", "flow_matching", "trajectory_guidance", "queue_gan_generator",
            "queue_gan_discriminator", "lrm_fit", "lrm_finetune", "ddpo"} <= set(KINDS)
    assert set(EXTRAS) <= set(KINDS), f"EXTRAS names unregistered kinds: {set(EXTRAS) - set(KINDS)}"
