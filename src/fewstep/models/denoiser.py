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
pipelines — pass the scale and the unconditional condition they have without deciding.

Forward-mode derivatives (SwiftVideo's continuous-time consistency needs dF/dt along the
PF-ODE) come from :meth:`Denoiser.jvp`: ``torch.func.jvp`` under the math SDPA backend
(PyTorch's CPU flash kernel has no forward AD), or a central finite difference as a fallback.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..diffusion.parameterization import Prediction, check_prediction_type
from ..diffusion.schedules import Schedule, expand_like
from .backbones import Backbone, Conditioning, ModuleBackbone

JVPMethod = Literal["autograd", "finite_difference"]


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
        # one batched pass over [cond; uncond]: (2B, C, T, H, W)
        both = Conditioning.cat([cond, uncond])
        out = self.backbone(torch.cat([x_t, x_t]), self.schedule.model_timestep(torch.cat([t, t])), both)
        self.nfe += 2
        out_c, out_u = out.chunk(2)
        pred_c = Prediction.from_output(self.prediction_type, out_c, x_t, alpha, sigma)
        pred_u = Prediction.from_output(self.prediction_type, out_u, x_t, alpha, sigma)
        return pred_c.guided(pred_u, cfg_scale)

    # ----------------------------------------------------------------------------------------
    def jvp(self, x_t: Tensor, t: Tensor, cond: Conditioning, tangent_x: Tensor, tangent_t: Tensor,
            output: Callable[[Prediction], Tensor] | str = "x0", *, cfg_scale: float | None = None,
            uncond: Conditioning | None = None, method: JVPMethod = "autograd",
            fd_step: float = 1e-3) -> tuple[Tensor, Tensor]:
        """Directional derivative of ``output(predict(x_t, t))`` along ``(tangent_x, tangent_t)``.

        Returns ``(value, d value)``. ``output`` names a :class:`Prediction` attribute (``"x0"``,
        ``"eps"``, ``"flow"``, …) or is a callable on the prediction.

        * ``"autograd"``: ``torch.func.jvp`` with attention forced onto the math SDPA kernel.
        * ``"finite_difference"``: ``(f(z + h·v) − f(z − h·v)) / 2h`` with ``h = fd_step``
          (second order; in float32 keep ``h`` around 1e-3 of the tangent's scale).
        """
        t = self._times(t, x_t)
        tangent_t = tangent_t.to(t.dtype).expand_as(t)
        read = output if callable(output) else (lambda p: getattr(p, output))

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
