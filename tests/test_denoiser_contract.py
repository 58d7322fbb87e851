"""One contract suite, run on every backbone adapter (STYLE §10: shared mixin-style tests).

Backbones: (a) the toy DiT as a plain module, (b) a tiny diffusers Wan (flow matching),
(c) a tiny diffusers CogVideoX (VP, v-prediction; with and without 3D RoPE), (d) a tiny
diffusers HunyuanVideo (flow matching, embedded guidance). All built from tiny random configs here.
"""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel

from fewstep.diffusion.schedules import FlowMatching, VPDiscrete
from fewstep.errors import UserError
from fewstep.models.backbones import CogVideoXBackbone, Conditioning, HunyuanVideoBackbone, load_diffusers_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.toy_dit import ToyDiT, ToyDiTConfig
from helpers import TEXT_DIM, make_wan, perturb


def make_toy():
    torch.manual_seed(0)
    cfg = ToyDiTConfig(in_channels=4, hidden_dim=32, depth=2, num_heads=2, text_dim=TEXT_DIM,
                       latent_frames=2, latent_height=4, latent_width=4, timestep_freq_dim=32)
    return Denoiser(perturb(ToyDiT(cfg)), FlowMatching(shift=1.0), "flow")


def make_cogvideox(rotary=False):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16 if rotary else 8, in_channels=4,
                                        out_channels=4, time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=2,
                                        sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
                                        temporal_compression_ratio=4, max_text_seq_length=6,
                                        use_rotary_positional_embeddings=rotary)
    return Denoiser(CogVideoXBackbone(perturb(model)), VPDiscrete(zero_terminal_snr=True), "v")


def make_hunyuan():
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=TEXT_DIM,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    return Denoiser(HunyuanVideoBackbone(perturb(model)), FlowMatching(shift=7.0), "flow")


FACTORIES = {"toy": make_toy, "wan": make_wan, "cogvideox": make_cogvideox,
             "cogvideox_rope": lambda: make_cogvideox(rotary=True), "hunyuanvideo": make_hunyuan}


@pytest.fixture(params=list(FACTORIES), scope="module")
def denoiser(request):
    return FACTORIES[request.param]().eval()


def _inputs(dtype=torch.float32, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2, 4, 4, generator=g).to(dtype)
    pooled = {"pooled_projections": torch.randn(batch, 8, generator=g).to(dtype)}  # used by HunyuanVideo only
    cond = Conditioning(torch.randn(batch, 6, TEXT_DIM, generator=g).to(dtype), extra=pooled)
    uncond = Conditioning(torch.zeros(batch, 6, TEXT_DIM, dtype=dtype), extra={k: 0 * v for k, v in pooled.items()})
    t = torch.tensor([0.3, 0.8], dtype=dtype)[:batch]
    return x, t, cond, uncond


def test_shapes_and_dtype(denoiser):
    x, t, cond, _ = _inputs()
    pred = denoiser.predict(x, t, cond)
    for field in (pred.x0, pred.eps, pred.v, pred.flow, pred.score):
        assert field.shape == x.shape and field.dtype == x.dtype
        assert torch.isfinite(field).all()
    out = denoiser(x, t, cond)
    torch.testing.assert_close(pred.to(denoiser.prediction_type), out, atol=1e-5, rtol=1e-4)


def test_determinism(denoiser):
    x, t, cond, _ = _inputs()
    assert torch.equal(denoiser(x, t, cond), denoiser(x, t, cond))


def test_conditioning_and_time_change_the_output(denoiser):
    x, t, cond, uncond = _inputs()
    base = denoiser(x, t, cond)
    assert (base - denoiser(x, t, uncond)).abs().max() > 1e-4
    assert (base - denoiser(x, t.flip(0), cond)).abs().max() > 1e-4


def test_cfg_only_when_a_scale_is_set_and_differs_from_one(denoiser):
    """``Denoiser.predict`` alone decides: w = None or 1 is the conditional prediction (one NFE)."""
    x, t, cond, uncond = _inputs()
    denoiser.reset_nfe()
    plain = denoiser.predict(x, t, cond)
    for w in (None, 1.0):
        same = denoiser.predict(x, t, cond, cfg_scale=w, uncond=uncond)
        assert torch.equal(same.x0, plain.x0)
    assert denoiser.reset_nfe() == 3  # unguided calls count one each
    # CFG with w equals the manual combination of two separate predictions, and counts two
    w = 3.5
    u = denoiser.predict(x, t, uncond)
    manual = u.to(denoiser.prediction_type) + w * (plain.to(denoiser.prediction_type) - u.to(denoiser.prediction_type))
    denoiser.reset_nfe()
    got = denoiser.predict(x, t, cond, cfg_scale=w, uncond=uncond).to(denoiser.prediction_type)
    assert denoiser.reset_nfe() == 2
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the unconditional condition"):
        denoiser.predict(x, t, cond, cfg_scale=w)


def test_batch_independence(denoiser):
    x, t, cond, _ = _inputs()
    full = denoiser(x, t, cond)
    first = denoiser(x[:1], t[:1], cond.index(slice(0, 1)))
    torch.testing.assert_close(full[:1], first, atol=1e-5, rtol=1e-4)


def test_jvp_matches_central_finite_differences(denoiser):
    """``torch.func.jvp`` (math SDPA) vs a central difference, in float64.

    The t-tangent is 1e-3 per unit of t (one model-timestep unit): diffusers' timestep
    embeddings compute in float32 whatever the model dtype, which limits how finely a
    finite difference can resolve the time direction.
    """
    model = denoiser.double()
    try:
        x, t, cond, uncond = _inputs(torch.float64, seed=1)
        g = torch.Generator().manual_seed(2)
        tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
        tt = torch.full_like(t, 1e-3)
        for kwargs in ({}, {"cfg_scale": 2.0, "uncond": uncond}):
            with torch.no_grad():
                value, jvp = model.jvp(x, t, cond, tx, tt, output="x0", **kwargs)
                _, fd = model.jvp(x, t, cond, tx, tt, output="x0", method="finite_difference", fd_step=1e-2,
                                  **kwargs)
                rel = float((jvp - fd).norm() / fd.norm())  # ~1e-5 for these backbones
                assert rel < 1e-3, rel
                torch.testing.assert_close(value, model.predict(x, t, cond, **kwargs).x0)
    finally:
        denoiser.float()


def test_gradients_reach_the_backbone(denoiser):
    x, t, cond, _ = _inputs()
    denoiser.zero_grad()
    denoiser.predict(x, t, cond).x0.square().mean().backward()
    grads = [p.grad for p in denoiser.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    denoiser.zero_grad()


@pytest.mark.parametrize("kind", ["wan", "cogvideox", "hunyuanvideo"])
def test_diffusers_backbones_load_from_a_local_directory(kind, tmp_path):
    den = FACTORIES[kind]().eval()
    den.backbone.model.save_pretrained(tmp_path / "transformer")
    loaded = load_diffusers_backbone(kind, tmp_path, subfolder="transformer").eval()
    x, t, cond, _ = _inputs()
    model_t = den.schedule.model_timestep(t)
    torch.testing.assert_close(loaded(x, model_t, cond), den.backbone(x, model_t, cond))
    with pytest.raises(UserError, match="no diffusers model"):
        load_diffusers_backbone(kind, tmp_path / "missing")
