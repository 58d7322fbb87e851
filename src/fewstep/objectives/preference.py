"""Trajectory alignment: flow-matching DPO on synthetic pairs + the reflow regulariser (SwiftVideo (003) Eq. 11).

For a pair ``(x0^w, x0^l)`` of one prompt (``batch.extra["preferred"]`` / ``["dispreferred"]``, a
preference store's), one ``t`` and one ``ε`` shared by both (``x_t^* = (1 − t)·x0^* + t·ε``, the target
velocity ``v^* = ε − x0^*``), with per-sample errors ``e^*_θ = ‖v^* − v_θ(x_t^*, t)‖²`` of the student and
``e^*_ref`` of the frozen reference (the distribution-aligned model)::

    L_DPO = −log σ(−β/2 · ((e^w_θ − e^w_ref) − (e^l_θ − e^l_ref)))            Eq. 11
    L_RF  = e^w_θ                                                          reflow on the preferred samples
    loss  = L_DPO + λ_RF · L_RF                                            (λ_RF = ``reflow_weight``: 2)

The errors are the denoiser's own flow-matching loss (:func:`fewstep.objectives.flow_matching.denoising_loss`:
the mean over (C, T, H, W), as Diffusion-DPO reduces its β = 2500 / 5000 losses), so ``reflow`` is exactly
the flow-matching loss on the preferred samples. The paper leaves t's distribution open; ``timesteps``
defaults to uniform (Diffusion-DPO's choice). Metrics: ``win_diff`` = ``e^w_θ − e^w_ref`` (the paper's
"Win Diff", Fig. 8: it grows when DPO alone lowers the loss by degrading the dispreferred side more),
``lose_diff``, and ``accuracy`` (the share of pairs with ``e^w_θ − e^w_ref < e^l_θ − e^l_ref``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..models.backbones import Conditioning
from .base import (Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext, TimestepsConfig,
                   UniformTimes, register_objective)
from .flow_matching import denoising_loss


class FlowDPOConfig(ObjectiveConfig):
    kind: Literal["flow_dpo"] = "flow_dpo"
    reference: RoleName = Field("reference", description="the frozen reference v_ref (the distribution-aligned model)")
    beta: float = Field(2500.0, gt=0, description="β of Eq. 11 (SwiftVideo: 2500)")
    reflow_weight: float = Field(2.0, ge=0, description="λ_RF (SwiftVideo: 2); 0 = DPO alone (Fig. 6, 8)")
    timesteps: TimestepsConfig = Field(default_factory=UniformTimes, description="distribution of t")

    def reads(self) -> set[str]:
        return {self.reference}

    def needs(self) -> set[str]:
        return {"preferred", "dispreferred"}


def flow_dpo_loss(e_w: Tensor, e_l: Tensor, e_w_ref: Tensor, e_l_ref: Tensor, beta: float) -> Tensor:
    """Eq. 11 per sample: ``−log σ(−β/2 · ((e_w − e_w_ref) − (e_l − e_l_ref)))``; all (B,)."""
    return -F.logsigmoid(-0.5 * beta * ((e_w - e_w_ref) - (e_l - e_l_ref)))


@register_objective
class FlowDPO(Objective):
    """SwiftVideo Eq. 11 + λ_RF·L_RF (module doc)."""

    kind = "flow_dpo"
    Config = FlowDPOConfig

    def errors(self, denoiser, win: Tensor, lose: Tensor, t: Tensor, eps: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(e^w, e^l)`` of ``denoiser``: both of one pass over ``[x^w; x^l]``, shared t and ε. (B,) each."""
        both = denoising_loss(denoiser, torch.cat([win, lose]), torch.cat([t, t]), torch.cat([eps, eps]),
                              Conditioning.cat([batch.cond, batch.cond]))  # (2B,)
        return both.chunk(2)

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student, reference = roles[self.role].module, roles[self.config.reference].module
        win, lose = batch.extra["preferred"], batch.extra["dispreferred"]  # (B, C, T, H, W) each
        t = ctx.times(self.distribution, "dpo/t").to(win.dtype)  # (B,)
        eps = ctx.randn(tuple(win.shape[1:]), "dpo/eps", dtype=win.dtype)  # one ε for both samples
        e_w, e_l = self.errors(student, win, lose, t, eps, batch)
        with torch.no_grad():
            e_w_ref, e_l_ref = self.errors(reference, win, lose, t, eps, batch)
        dpo = flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, self.config.beta)
        win_diff, lose_diff = (e_w - e_w_ref).detach(), (e_l - e_l_ref).detach()
        return self.output({"dpo": dpo, "reflow": self.config.reflow_weight * e_w},
                           {"win_diff": float(win_diff.mean()), "lose_diff": float(lose_diff.mean()),
                            "accuracy": float((win_diff < lose_diff).float().mean())})
