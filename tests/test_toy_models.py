"""Toy DiT, codec and text encoder: shapes, adaLN-Zero, conditioning, checkpointing, JVP, training."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.errors import UserError
from fewstep.models.codec import ToyCodec, ToyCodecConfig, frames_to_video, psnr, video_to_frames
from fewstep.models.text_encoder import ToyTextEncoder, ToyTextEncoderConfig, WordTokenizer
from fewstep.models.toy_dit import ToyDiT

TINY_DIT = dict(hidden_dim=32, depth=3, num_heads=2, text_dim=16, latent_frames=4, latent_height=4, latent_width=4)


def tiny_dit(**overrides) -> ToyDiT:
    torch.manual_seed(0)
    return ToyDiT.from_config({**TINY_DIT, **overrides})


def dit_inputs(batch=2, grid=(4, 4, 4), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *grid, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 1000
    context = torch.randn(batch, 5, 16, generator=g, dtype=dtype)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, context, mask


def perturb_zero_init(model: ToyDiT, std: float = 0.05, seed: int = 123) -> None:
    """Move the adaLN-Zero parameters (modulation + final layer) away from zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [model.adaLN_modulation[-1].weight, model.adaLN_modulation[-1].bias]
        params += [block.modulation for block in model.blocks]
        params += list(model.final_layer.parameters())
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ----------------------------------------------------------------------------- DiT


def test_dit_default_size_and_tokens():
    model = ToyDiT()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n_params < 2e6
    tokens = model.patchify(torch.zeros(1, 4, 8, 8, 8))
    assert tokens.shape == (1, 128, 4 * 1 * 2 * 2)
    assert model.pos_embed.shape == (1, 128, 128)


def test_dit_shape_and_zero_init_output():
    model = tiny_dit()
    x, t, context, mask = dit_inputs()
    out = model(x, t, context, mask)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: final layer starts at zero


def test_dit_conditioning_changes_output():
    model = tiny_dit()
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs()
    out = model(x, t, context, mask)
    assert out.abs().max() > 0
    assert not torch.allclose(out, model(x, t + 100.0, context, mask))
    assert not torch.allclose(out, model(x, t, torch.randn_like(context), mask))
    # a masked-out token does not influence the output; an unmasked one does
    masked_change = context.clone()
    masked_change[0, 4] += 10.0
    assert torch.allclose(out, model(x, t, masked_change, mask), atol=1e-6)
    masked_change[0, 0] += 10.0
    assert not torch.allclose(out[0], model(x, t, masked_change, mask)[0])


def test_dit_all_masked_context_is_finite():
    model = tiny_dit()
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs()
    mask[1] = False
    out = model(x, t, context, mask)
    assert torch.isfinite(out).all()


def test_dit_deterministic():
    model = tiny_dit()
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs()
    assert torch.equal(model(x, t, context, mask), model(x, t, context, mask))


def test_dit_return_features():
    model = tiny_dit()
    x, t, context, mask = dit_inputs()
    out, feats = model(x, t, context, mask, return_features=[0, -1])
    assert out.shape == x.shape
    assert len(feats) == 2 and all(f.shape == (2, 4 * 2 * 2, 32) for f in feats)
    _, last = model(x, t, context, mask, return_features=[2])
    assert torch.equal(last[0], feats[1])
    with pytest.raises(UserError, match="return_features"):
        model(x, t, context, mask, return_features=[3])


def test_dit_gradient_checkpointing_matches():
    model = tiny_dit().train()
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs()

    def run(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        out = model(x, t, context, mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_ref, grads_ref = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert torch.allclose(out_ref, out_ckpt)
    for g_ref, g_ckpt in zip(grads_ref, grads_ckpt):
        assert torch.allclose(g_ref, g_ckpt, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own JVP decomps
def test_dit_jvp_matches_finite_differences():
    model = tiny_dit().double().eval()
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs(dtype=torch.float64)
    v_x = torch.randn_like(x)
    v_t = torch.randn_like(t) * 10

    def f(x_, t_):
        return model(x_, t_, context, mask)

    with sdpa_kernel(SDPBackend.MATH):
        _, jvp_x = torch.func.jvp(lambda x_: f(x_, t), (x,), (v_x,))
        _, jvp_xt = torch.func.jvp(f, (x, t), (v_x, v_t))
    eps = 1e-6
    with torch.no_grad():
        fd_x = (f(x + eps * v_x, t) - f(x - eps * v_x, t)) / (2 * eps)
        fd_xt = (f(x + eps * v_x, t + eps * v_t) - f(x - eps * v_x, t - eps * v_t)) / (2 * eps)
    assert jvp_x.abs().max() > 1e-3  # not trivially zero
    assert (jvp_x - fd_x).norm() / fd_x.norm() < 1e-4
    assert (jvp_xt - fd_xt).norm() / fd_xt.norm() < 1e-4


def test_dit_other_grid_size():
    model = tiny_dit(patch_size=(2, 2, 2))
    perturb_zero_init(model)
    x, t, context, mask = dit_inputs(grid=(6, 8, 2))
    out, feats = model(x, t, context, mask, return_features=[-1])
    assert out.shape == x.shape
    assert feats[0].shape == (2, 3 * 4 * 1, 32)
    assert torch.isfinite(out).all()
    with pytest.raises(UserError, match="divisible by patch_size"):
        model(torch.zeros(1, 4, 5, 4, 4), t[:1], context[:1])


def test_dit_config_errors():
    with pytest.raises(UserError, match="hidden_dimm"):
        ToyDiT.from_config({"hidden_dimm": 64})


# ----------------------------------------------------------------------------- codec


def square_videos(batch: int = 4, frames: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Coloured squares moving right over a grey background, ``(B, 3, T, H, W)`` in [−1, 1]."""
    g = torch.Generator().manual_seed(seed)
    video = torch.full((batch, 3, frames, size, size), -0.5)
    for b in range(batch):
        colour = torch.rand(3, generator=g) * 2 - 1
        side = 4 + b % 3
        row = int(torch.randint(0, size - side, (1,), generator=g))
        for f in range(frames):
            col = (f + 2 * b) % (size - side)
            video[b, :, f, row : row + side, col : col + side] = colour[:, None, None]
    return video


def test_codec_shapes_and_params():
    codec = ToyCodec()
    assert sum(p.numel() for p in codec.parameters()) < 0.5e6
    video = torch.rand(2, 3, 16, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = codec.encode(video)
        recon = codec.decode(latents)
    assert latents.shape == (2, 4, 8, 8, 8) == codec.latent_shape(video.shape)
    assert recon.shape == video.shape
    assert recon.min() >= -1 and recon.max() <= 1
    frames = video_to_frames(video)
    assert frames.shape == (2, 16, 32, 32, 3)
    assert torch.equal(frames_to_video(frames), video)
    with pytest.raises(UserError, match="divisible"):
        codec.encode(torch.zeros(1, 3, 15, 32, 32))


def test_codec_normalisation_roundtrip():
    torch.manual_seed(0)
    codec = ToyCodec(ToyCodecConfig(scaling_factor=2.5, shift_factor=0.3))
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    with torch.no_grad():
        z = codec.encode_raw(video)
        assert torch.allclose(codec.encode(video), (z - 0.3) * 2.5)
        assert torch.allclose(codec.decode(codec.encode(video), clamp=False), codec.decode_raw(z), atol=1e-6)


def test_psnr():
    a = torch.zeros(2, 3, 2, 4, 4)
    b = a + 0.2  # mse 0.04 → 10·log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0))


def test_codec_training_reduces_loss():
    torch.manual_seed(0)
    codec = ToyCodec(ToyCodecConfig(base_channels=16))
    video = square_videos()
    opt = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, metrics = codec.reconstruction_loss(video)
        assert loss.shape == (video.shape[0],)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0]
    assert metrics["psnr"] > 20


# ----------------------------------------------------------------------------- text encoder

VOCAB = ["a", "red", "blue", "circle", "square", "moving", "left", "right"]


def test_tokenizer_ids_and_mask():
    tok = WordTokenizer(VOCAB, max_length=6)
    ids, mask = tok(["A red circle", "", "blue  square moving   right"])
    assert ids.shape == mask.shape == (3, 6)
    assert ids[0].tolist() == [1, 2, 3, 5, 0, 0]
    assert mask[0].tolist() == [True, True, True, True, False, False]
    assert ids[1].tolist() == [1, 0, 0, 0, 0, 0]  # empty prompt: only the null token
    assert mask[1].tolist() == [True, False, False, False, False, False]
    assert ids[2].tolist() == [1, 4, 6, 7, 9, 0]


def test_tokenizer_errors():
    tok = WordTokenizer(VOCAB, max_length=4)
    with pytest.raises(UserError, match="unknown word 'green'") as err:
        tok(["a green circle"])
    assert "\n" not in str(err.value) and "vocabulary: a, red, blue" in str(err.value)
    with pytest.raises(UserError, match="at most 3"):
        tok(["a red circle moving"])


def test_text_encoder_shapes_and_embeddings():
    torch.manual_seed(0)
    encoder = ToyTextEncoder.from_config({"vocab": VOCAB, "max_length": 8, "dim": 32, "depth": 2, "heads": 4}).eval()
    tokens, mask = encoder.encode(["a red circle moving left", "a blue square moving right", ""])
    assert tokens.shape == (3, 8, 32) and mask.shape == (3, 8)
    assert torch.isfinite(tokens).all()
    assert torch.equal(tokens[~mask], torch.zeros_like(tokens[~mask]))
    pooled = encoder.pooled(tokens, mask)
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)
    assert not torch.allclose(pooled[0], pooled[2], atol=1e-3)
    # deterministic, and independent of the other prompts in the batch
    tokens_again, _ = encoder.encode(["a red circle moving left"])
    assert torch.allclose(tokens_again[0], tokens[0], atol=1e-6)


def test_text_encoder_feeds_dit_with_empty_prompt():
    torch.manual_seed(0)
    encoder = ToyTextEncoder(ToyTextEncoderConfig(vocab=VOCAB, dim=16, heads=2))
    model = tiny_dit()
    perturb_zero_init(model)
    tokens, mask = encoder.encode(["", "a red circle"])
    x, t, _, _ = dit_inputs()
    out = model(x, t, tokens, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
