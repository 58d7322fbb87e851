"""Block features of any backbone through one API (``fewstep.models.features``), on the toy DiT
and on a tiny diffusers Wan transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.models.features import depth, extract_features, find_blocks, token_grid
from helpers import const_cond, make_tiny_pipeline, make_wan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_toy_features_are_the_dits_hidden_states():
    pipe = make_tiny_pipeline()
    teacher = pipe.denoiser
    x = torch.randn(pipe.latent_shape(3), generator=torch.Generator().manual_seed(0))  # (3, 4, 4, 4, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    cond = pipe.encode_prompts(["a red circle moves left"] * 3)
    teacher.reset_nfe()
    hooked = extract_features(teacher, x, t, cond, [-1, 0])
    assert teacher.reset_nfe() == 1  # one forward pass for every block asked
    # the DiT's own return_features path, an independent computation
    timestep = teacher.schedule.model_timestep(t)
    _, direct = teacher.backbone.module(x, timestep, cond.context, context_mask=cond.mask, return_features=[-1, 0])
    for a, b in zip(hooked, direct):
        torch.testing.assert_close(a, b)
    # a bare backbone takes the model timestep, and gives the same tokens
    for a, b in zip(extract_features(teacher.backbone, x, timestep, cond, [-1, 0]), hooked):
        torch.testing.assert_close(a, b)
    assert depth(teacher) == 2 and token_grid(teacher, x.shape, hooked[0].shape[1]) == (4, 2, 2)
    with pytest.raises(UserError, match="out of range for a backbone of depth 2"):
        extract_features(teacher, x, t, cond, [2])
    with pytest.raises(UserError, match="exposes no transformer blocks"):
        extract_features(nn.Linear(2, 2), x, t, cond, [0])


def test_wan_features_through_hooks_at_the_edge():
    wan = make_wan().eval()
    x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    t = torch.tensor([0.3, 0.8])
    cond = const_cond(2, 0.5, torch.float32)
    cond.context = cond.context.expand(2, 6, 16).contiguous()  # (B, L, text_dim)
    out = wan(x, t, cond)
    first, last, again = extract_features(wan, x.requires_grad_(True), t, cond, [0, -1, 1])
    assert first.shape == last.shape == (2, 2 * 2 * 2, 16)  # (B, T'·H'·W', 2 heads × 8); patch (1, 2, 2)
    torch.testing.assert_close(last, again)  # -1 is the last of 2 blocks
    assert (first - last).abs().max() > 1e-4
    _, blocks = find_blocks(wan)
    assert all(not block._forward_hooks for block in blocks)  # the hooks are removed afterwards
    torch.testing.assert_close(wan(x.detach(), t, cond), out)  # and the network's output is unchanged
    # the bare diffusers adapter with the model timestep catches the same tokens
    bare = extract_features(wan.backbone, x.detach(), wan.schedule.model_timestep(t), cond, [-1])[0]
    torch.testing.assert_close(bare, last)
    last.square().sum().backward()  # gradients reach the input through the frozen network
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert token_grid(wan, x.shape, last.shape[1]) == (2, 2, 2)
    with pytest.raises(UserError, match="cannot lay 8 block tokens"):
        token_grid(wan, (2, 4, 2, 8, 8), 8)
