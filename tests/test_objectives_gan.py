"""GAN losses against hand-computed values and gradient signs (RGTD Eq. 11–12, AccVideo Eq. 7),
and the plain discriminator heads."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.objectives.gan import (FrameHead, MultiHeads, discriminator_loss, generator_loss,
                                    hinge_discriminator_loss, hinge_generator_loss, minimax_generator_loss,
                                    non_saturating_discriminator_loss, non_saturating_generator_loss)

D_REAL = [2.0, -1.0, 0.3]
D_FAKE = [-0.5, 1.5, 0.0]


def logits(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_hinge_losses_by_hand():
    d_real, d_fake = logits(D_REAL), logits(D_FAKE)
    # max(0, 1 − d_real) + max(0, 1 + d_fake), sample by sample
    expected = [max(0, 1 - 2.0) + max(0, 1 - 0.5), max(0, 1 + 1.0) + max(0, 1 + 1.5), max(0, 1 - 0.3) + max(0, 1)]
    assert expected == pytest.approx([0.5, 4.5, 1.7])
    loss_d = hinge_discriminator_loss(d_real, d_fake)
    torch.testing.assert_close(loss_d, torch.tensor(expected, dtype=torch.float64))
    loss_d.sum().backward()
    # D pushes real logits up and fake logits down, only inside the margin
    assert d_real.grad.tolist() == [0.0, -1.0, -1.0]  # d_real = 2 is past the margin: no gradient
    assert d_fake.grad.tolist() == [1.0, 1.0, 1.0]

    d_fake = logits(D_FAKE)
    loss_g = hinge_generator_loss(d_fake)
    torch.testing.assert_close(loss_g, torch.tensor([0.5, -1.5, 0.0], dtype=torch.float64))  # −d_fake
    loss_g.sum().backward()
    assert d_fake.grad.tolist() == [-1.0, -1.0, -1.0]  # G pushes fake logits up, everywhere


def test_non_saturating_losses_by_hand():
    d_real, d_fake = logits(D_REAL), logits(D_FAKE)

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    # −log D(real) − log(1 − D(fake)), D = sigmoid
    expected = [-math.log(sigmoid(r)) - math.log(1 - sigmoid(f)) for r, f in zip(D_REAL, D_FAKE)]
    loss_d = non_saturating_discriminator_loss(d_real, d_fake)
    torch.testing.assert_close(loss_d, torch.tensor(expected, dtype=torch.float64))
    loss_d.sum().backward()
    # ∂/∂d_real = −(1 − D(real)) < 0, ∂/∂d_fake = D(fake) > 0
    torch.testing.assert_close(d_real.grad, torch.tensor([-(1 - sigmoid(r)) for r in D_REAL], dtype=torch.float64))
    torch.testing.assert_close(d_fake.grad, torch.tensor([sigmoid(f) for f in D_FAKE], dtype=torch.float64))
    assert bool((d_real.grad < 0).all()) and bool((d_fake.grad > 0).all())

    d_fake = logits(D_FAKE)
    loss_g = non_saturating_generator_loss(d_fake)  # −log D(fake)
    torch.testing.assert_close(loss_g, torch.tensor([-math.log(sigmoid(f)) for f in D_FAKE], dtype=torch.float64))
    loss_g.sum().backward()
    torch.testing.assert_close(d_fake.grad, torch.tensor([-(1 - sigmoid(f)) for f in D_FAKE], dtype=torch.float64))
    assert bool((d_fake.grad < 0).all())  # G raises D(fake)

    d_fake = logits(D_FAKE)
    loss_mm = minimax_generator_loss(d_fake)  # log(1 − D(fake)), Eq. 7 literally
    torch.testing.assert_close(loss_mm, torch.tensor([math.log(1 - sigmoid(f)) for f in D_FAKE], dtype=torch.float64))
    loss_mm.sum().backward()
    assert bool((d_fake.grad < 0).all())  # the same direction, with a gradient that vanishes as D(fake) → 0


def test_losses_by_name():
    d_real, d_fake = torch.tensor(D_REAL), torch.tensor(D_FAKE)
    torch.testing.assert_close(discriminator_loss("hinge", d_real, d_fake), hinge_discriminator_loss(d_real, d_fake))
    for kind in ("non_saturating", "minimax"):  # both forms train D alike
        torch.testing.assert_close(discriminator_loss(kind, d_real, d_fake),
                                   non_saturating_discriminator_loss(d_real, d_fake))
    torch.testing.assert_close(generator_loss("hinge", d_fake), hinge_generator_loss(d_fake))
    torch.testing.assert_close(generator_loss("minimax", d_fake), minimax_generator_loss(d_fake))
    torch.testing.assert_close(generator_loss("non_saturating", d_fake), non_saturating_generator_loss(d_fake))


def test_frame_head_and_multi_heads():
    torch.manual_seed(0)
    head = FrameHead(channels=8, width=8)
    feats = torch.randn(3, 8, 2, 3, 3)  # (B, D, T', H', W')
    out = head(feats)
    assert out.shape == (3,)
    for b in range(3):  # by hand: the 2-D layers on every frame, one logit per position, averaged
        torch.testing.assert_close(out[b], head.frames(feats[b].permute(1, 0, 2, 3)).mean())

    heads = MultiHeads([8, 4], width=8)
    maps = [torch.randn(3, 8, 2, 3, 3), torch.randn(3, 4, 2, 2, 2)]  # two feature levels
    both = heads(maps)
    assert both.shape == (3, 2)
    torch.testing.assert_close(both[:, 1], heads.heads[1](maps[1]))
    hinge_discriminator_loss(both, -both).mean(1).sum().backward()  # per head, averaged over heads
    assert all(p.grad is not None for p in heads.parameters())
    with pytest.raises(ValueError, match="2 heads need 2 feature maps"):
        heads(maps[:1])
