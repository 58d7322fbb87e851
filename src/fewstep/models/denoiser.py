"""The Denoiser: backbone + schedule + prediction type + CFG, behind one call.

``Denoiser.predict(x_t, t, cond, cfg_scale=None, uncond=None) -> Prediction`` is the only way
objectives and samplers see a network (STYLE §1). ``t`` is continuous time in [0, 1]
(DESIGN §2); the schedule maps it to the coefficients (α, σ) and to the backbone's model
timestep; the declared ``prediction_type`` turns the raw output into a
:class:`~fewstep.diffusion.parameterization.Prediction`.

CFG is DESIGN §2's single formula ``uncond + w·(cond − uncond)``; the conditional and
unconditional passes run as one batch and count as two function evaluations (NFE). Whether a call
is guided is decided here and nowhere else (DESIGN §1): only when a scale is set and differs from
1 (:func:`cfg_active`; ``w = 1`` *is* the conditional prediction). Callers — samplers, objectives,
pipelines — pass the scale and the unconditional condition they have without deciding. For an
image-to-video model the unconditional branch drops the caption only: ``uncond`` gets the visual
extras of ``cond`` it lacks (:meth:`Conditioning.with_visual_of`), as the Wan and CogVideoX I2V pipelines
keep the image in their negative pass, so every caller passing ``null_condition(B)`` stays correct.

Forward-mode derivatives (SwiftVideo's continuous-time consistency needs dF/dt along the
PF-ODE) come from :meth:`Denoiser.jvp`: ``torch.func.jvp`` over the whole network under the math
SDPA backend (PyTorch's CPU flash kernel has no forward AD), block by block (SwiftVideo (003)
Alg. 2, :func:`blockwise_jvp`), or a central finite difference as a fallback.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..diffusion.parameterization import Prediction, check_prediction_type
from ..diffusion.schedules import Schedule, expand_like
from .backbones import Backbone, BlockwiseForward, Conditioning, ModuleBackbone

JVPMethod = Literal["autograd", "blockwise", "finite_difference"]


def blockwise_jvp(parts: BlockwiseForward, x: Tensor, timestep: Tensor, tangent_x: Tensor,
                  tangent_timestep: Tensor) -> tuple[Tensor, Tensor]:
    """SwiftVideo (003) Alg. 2: the backbone's output and its JVP along ``(tangent_x, tangent_timestep)``.

    Time embedding and patch embedding first (l. 3–7), then one ``torch.func.jvp`` per block with the
    value and tangent detached between blocks (l. 8–13), then the output layer (l. 14). Runs without
    autograd — Alg. 2's ``sg`` — so only one block's primal and tangent activations are alive at a
    time. Attention runs on the math SDPA kernel (forward AD). Shapes: x, tangent_x (B, C, T, H, W);
    timestep, tangent_timestep (B,).
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        state, d_state = torch.func.jvp(parts.time_embed, (timestep,), (tangent_timestep,))  # l. 4
        h, g = torch.func.jvp(parts.patch_embed, (x,), (tangent_x,))  # l. 6–7: (B, N, D) each
        for block in parts.blocks:  # l. 8–13
            h, g = torch.func.jvp(block, (h, *state), (g, *d_state))
            h, g = h.detach(), g.detach()
        return torch.func.jvp(parts.output, (h, *state), (g, *d_state))  # l. 14


def cfg_active(cfg_scale: float | None) -> bool:
    """Whether CFG scale ``w`` guides: set and not 1 (``w = 1`` is the conditional prediction)."""
    return cfg_scale is not None and cfg_scale != 1.0


class Denoiser(nn.Module):
    """``Denoiser(backbone, schedule, prediction_type)``.

    ``backbone`` follows the adapter contract of :mod:`fewstep.models.backbones`; a plain module
    ``module(x, timestep, context)`` is wrapped in :class:`ModuleBackbone` automatically.
    """

    def __init__(self, backbone: nn.Module, schedule: Schedule, prediction_type: str):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, Backbone) else ModuleBackbone(backbone)
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.nfe = 0  # network function evaluations since the last reset (a CFG call counts 2)

    # ----------------------------------------------------------------------------------------
    def reset_nfe(self) -> int:
        n, self.nfe = self.nfe, 0
        return n

    def _times(self, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``t`` as a ``(B,)`` float tensor in ``x_t``'s dtype (keeps autograd/JVP links)."""
        t = torch.as_tensor(t, device=x_t.device)
        if not t.is_floating_point() or t.dtype != x_t.dtype:
            t = t.to(x_t.dtype)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return t

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning) -> Tensor:
        """The raw backbone output at continuous time ``t`` (no CFG); counts one NFE."""
        t = self._times(t, x_t)
        self.nfe += 1
        return self.backbone(x_t, self.schedule.model_timestep(t), cond)

    def predict(self, x_t: Tensor, t: Tensor | float, cond: Conditioning,
                cfg_scale: float | None = None, uncond: Conditioning | None = None) -> Prediction:
        """Prediction at ``(x_t, t)``; CFG-guided by ``uncond`` when :func:`cfg_active` (``cfg_scale``).

        x_t: (B, C, T, H, W); t: scalar or (B,); cond/uncond: batch B each. An unguided call counts
        one NFE and ignores ``uncond``; a guided one counts two and needs ``uncond``.
        """
        t = self._times(t, x_t)
        alpha, sigma = expand_like(self.schedule.alpha(t), x_t), expand_like(self.schedule.sigma(t), x_t)
        if not cfg_active(cfg_scale):
            out = self(x_t, t, cond)
            return Prediction.from_output(self.prediction_type, out, x_t, alpha, sigma)
        if uncond is None:
            raise ValueError(f"CFG scale {cfg_scale} needs the unconditional condition (uncond)")
        # one batched pass over [cond; uncond]: (2B, C, T, H, W); the unconditional branch of an
        # image-conditioned model keeps cond's image (Conditioning.with_visual_of)
        both = Conditioning.cat([cond, uncond.with_visual_of(cond)])
        out = self.backbone(torch.cat([x_t, x_t]), self.schedule.model_timestep(torch.cat([t, t])), both)
        self.nfe += 2
        out_c, out_u = out.chunk(2)
        pred_c = Prediction.from_output(self.prediction_type, out_c, x_t, alpha, sigma)
        pred_u = Prediction.from_output(self.prediction_type, out_u, x_t, alpha, sigma)
        return pred_c.guided(pred_u, self.cfg_scales(t, cfg_scale, x_t))

    def cfg_scales(self, t: Tensor, cfg_scale: float, x_t: Tensor) -> float | Tensor:
        """The CFG scale ``w`` of each sample of a guided call: ``cfg_scale``, or per sample where the backbone
        says so (:meth:`~fewstep.models.backbones.Backbone.cfg_scales`: Wan 2.2's low-noise expert has its own
        ``guidance_scale_2``), broadcast like ``x_t``."""
        scale = self.backbone.cfg_scales(self.schedule.model_timestep(t), cfg_scale)
        return expand_like(scale, x_t) if isinstance(scale, Tensor) else scale

    # ----------------------------------------------------------------------------------------
    def jvp(self, x_t: Tensor, t: Tensor, cond: Conditioning, tangent_x: Tensor, tangent_t: Tensor,
            output: Callable[[Prediction], Tensor] | str = "x0", *, cfg_scale: float | None = None,
            uncond: Conditioning | None = None, method: JVPMethod = "autograd",
            fd_step: float = 1e-3) -> tuple[Tensor, Tensor]:
        """Directional derivative of ``output(predict(x_t, t))`` along ``(tangent_x, tangent_t)``.

        Returns ``(value, d value)``. ``output`` names a :class:`Prediction` attribute (``"x0"``,
        ``"eps"``, ``"flow"``, …) or is a callable on the prediction.

        * ``"autograd"``: ``torch.func.jvp`` over the whole call, attention on the math SDPA kernel.
        * ``"blockwise"``: SwiftVideo Alg. 2 (:func:`blockwise_jvp`) over the backbone's split
          (:meth:`~fewstep.models.backbones.Backbone.blockwise`; toy DiT and Wan), the schedule's
          model timestep and the prediction-type conversion (and CFG) differentiated around it.
          Value and derivative come back detached (Alg. 2's stop-gradient).
        * ``"finite_difference"``: ``(f(z + h·v) − f(z − h·v)) / 2h`` with ``h = fd_step``
          (second order; in float32 keep ``h`` around 1e-3 of the tangent's scale).
        """
        t = self._times(t, x_t)
        tangent_t = tangent_t.to(t.dtype).expand_as(t)
        read = output if callable(output) else (lambda p: getattr(p, output))
        if method == "blockwise":
            return self._blockwise_jvp(x_t, t, cond, tangent_x, tangent_t, read, cfg_scale, uncond)

        def f(x, tt):
            return read(self.predict(x, tt, cond, cfg_scale=cfg_scale, uncond=uncond))

        if method == "autograd":
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(f, (x_t, t), (tangent_x, tangent_t))
        if method == "finite_difference":
            h = fd_step
            value = f(x_t, t)
            plus, minus = f(x_t + h * tangent_x, t + h * tangent_t), f(x_t - h * tangent_x, t - h * tangent_t)
            return value, (plus - minus) / (2 * h)
        raise ValueError(f"unknown JVP method {method!r}")

    def _blockwise_jvp(self, x_t, t, cond, tangent_x, tangent_t, read, cfg_scale, uncond) -> tuple[Tensor, Tensor]:
        """:meth:`jvp` with ``method="blockwise"``: model timestep → Alg. 2 on the backbone → prediction."""
        guided = cfg_active(cfg_scale)
        if guided and uncond is None:
            raise ValueError(f"CFG scale {cfg_scale} needs the unconditional condition (uncond)")
        with torch.no_grad():
            timestep, d_timestep = torch.func.jvp(self.schedule.model_timestep, (t,), (tangent_t,))  # (B,) each
            x, d_x, both = x_t, tangent_x, cond
            if guided:  # one batched pass over [cond; uncond], as predict does
                x, d_x = torch.cat([x_t, x_t]), torch.cat([tangent_x, tangent_x])
                both = Conditioning.cat([cond, uncond.with_visual_of(cond)])  # the image kept, as predict does
                timestep, d_timestep = torch.cat([timestep, timestep]), torch.cat([d_timestep, d_timestep])
            out, d_out = blockwise_jvp(self.backbone.blockwise(x, timestep, both), x, timestep, d_x, d_timestep)
            self.nfe += 2 if guided else 1

            def convert(x_, t_, out_):  # raw output → the prediction read, with CFG; elementwise
                alpha, sigma = expand_like(self.schedule.alpha(t_), x_), expand_like(self.schedule.sigma(t_), x_)
                if not guided:
                    return read(Prediction.from_output(self.prediction_type, out_, x_, alpha, sigma))
                out_c, out_u = out_.chunk(2)
                pred_c = Prediction.from_output(self.prediction_type, out_c, x_, alpha, sigma)
                pred_u = Prediction.from_output(self.prediction_type, out_u, x_, alpha, sigma)
                return read(pred_c.guided(pred_u, self.cfg_scales(t_, cfg_scale, x_)))

            return torch.func.jvp(convert, (x_t, t, out), (tangent_x, tangent_t, d_out))
