"""SwiftVideo's block-wise JVP (papers/003, Alg. 2) against the whole-model JVP and central differences,
in float64, on the toy DiT and a tiny diffusers Wan (the two backbones with a block-wise split)."""

from __future__ import annotations

import pytest
import torch

from fewstep.diffusion.schedules import FlowMatching
from fewstep.errors import UserError
from fewstep.models.backbones import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.toy_dit import ToyDiT, ToyDiTConfig
from helpers import TEXT_DIM, make_wan, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def make_toy(shift=1.0):
    torch.manual_seed(0)
    cfg = ToyDiTConfig(in_channels=4, hidden_dim=32, depth=3, num_heads=2, text_dim=TEXT_DIM,
                       latent_frames=2, latent_height=4, latent_width=4, timestep_freq_dim=32)
    return Denoiser(perturb(ToyDiT(cfg), scale=0.05), FlowMatching(shift=shift), "flow")


FACTORIES = {"toy": make_toy, "toy_shift3": lambda: make_toy(shift=3.0), "wan": make_wan}


@pytest.fixture(params=list(FACTORIES), scope="module")
def denoiser64(request):
    return FACTORIES[request.param]().eval().double()


def inputs(seed=0, batch=2, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2, 4, 4, generator=g, dtype=F64)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])[:batch] if masked else None
    cond = Conditioning(torch.randn(batch, 6, TEXT_DIM, generator=g, dtype=F64), mask)
    uncond = Conditioning(torch.zeros(batch, 6, TEXT_DIM, dtype=F64), None if mask is None else torch.ones_like(mask))
    t = torch.tensor([0.3, 0.8], dtype=F64)[:batch]
    tx = torch.randn(x.shape, generator=g, dtype=F64)
    tt = torch.tensor([1.0, -0.5], dtype=F64)[:batch]
    return x, t, cond, uncond, tx, tt


def test_the_split_is_the_forward(denoiser64):
    """Time embedding → patch embedding → blocks → output layer equals the backbone's own forward."""
    x, t, cond, *_ = inputs(masked=True)
    timestep = denoiser64.schedule.model_timestep(t)
    with torch.no_grad():
        split = denoiser64.backbone.blockwise(x, timestep, cond)(x, timestep)
        whole = denoiser64.backbone(x, timestep, cond)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("output", ["flow", "x0"])
def test_blockwise_equals_whole_model_jvp(denoiser64, output, guided):
    """Same value and same tangent as ``torch.func.jvp`` over the whole call (with and without CFG)."""
    x, t, cond, uncond, tx, tt = inputs(masked=True)
    cfg = {"cfg_scale": 2.5, "uncond": uncond} if guided else {}
    with torch.no_grad():
        value, tangent = denoiser64.jvp(x, t, cond, tx, tt, output=output, method="autograd", **cfg)
        value_b, tangent_b = denoiser64.jvp(x, t, cond, tx, tt, output=output, method="blockwise", **cfg)
    assert tangent.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(value_b, value, rtol=0, atol=1e-10)
    torch.testing.assert_close(tangent_b, tangent, rtol=1e-9, atol=1e-9)


def test_the_time_direction_matches_central_differences(denoiser64):
    """dF/dt along (dx/dt, 1) (SwiftVideo Eq. 8, 14) from Alg. 2 equals a central difference.

    The step and tolerance follow what float64 can resolve: the toy DiT's sinusoid resolves periods
    down to one model-timestep unit (h = 1e-6 in t leaves ~1e-7 relative error); diffusers' Wan
    computes its timestep sinusoid in float32 whatever the model dtype, which bounds a central
    difference in t at ~1e-3 relative error (h = 1e-4; smaller steps get worse).
    """
    x, t, cond, _, tx, _ = inputs(seed=1)
    tt = torch.ones_like(t)
    wan = not hasattr(denoiser64.backbone, "module")
    h, tol = (1e-4, 5e-3) if wan else (1e-6, 1e-5)
    with torch.no_grad():
        _, tangent = denoiser64.jvp(x, t, cond, tx, tt, output="flow", method="blockwise")
        _, fd = denoiser64.jvp(x, t, cond, tx, tt, output="flow", method="finite_difference", fd_step=h)
    rel = float((tangent - fd).norm() / fd.norm())
    assert rel < tol, rel


def test_blockwise_needs_a_split(tmp_path):
    """A backbone without a block-wise split says which methods work (one line)."""
    from helpers import GaussianX0

    den = Denoiser(GaussianX0(FlowMatching(), torch.zeros(1, 1, 1, 1)), FlowMatching(), "x0")
    x, t, cond, _, tx, tt = inputs()
    with pytest.raises(UserError, match="no block-wise split.*'autograd' or 'finite_difference'"):
        den.jvp(x, t, cond, tx, tt, method="blockwise")


def test_blockwise_runs_in_float32_under_a_trainable_student():
    """Float32 weights that require grad (a live student): detached results, close to autograd's."""
    den = make_toy().train()
    x, t, cond, _, tx, tt = (v.float() if torch.is_tensor(v) else v for v in inputs())
    cond = Conditioning(cond.context.float())
    value, tangent = den.jvp(x, t, cond, tx, tt, output="flow", method="blockwise")
    assert not value.requires_grad and not tangent.requires_grad
    with torch.no_grad():
        ref_value, ref_tangent = den.jvp(x, t, cond, tx, tt, output="flow", method="autograd")
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-4, atol=1e-4)
