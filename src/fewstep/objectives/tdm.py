"""Trajectory distribution matching (RGTD (000) §3.2, Eq. 2–10; TDM, Luo et al. 2025) and its fake score.

The K-step student ``G_θ`` (the run's ``generator:``, times ``t_0 > … > t_{K−1} > t_K = 0``) is
matched to the teacher not only at its output but along its trajectory: at every step ``k`` the
state the step lands on is diffused into that step's interval, and the diffused marginals of
student and teacher are compared there (Eq. 3, one KL per step).

**What is diffused (the paper is loose; TDM's code settles it).** RGTD writes
``p_{θ,τ}(x_τ) = ∫ q(x_τ | x_{t_i}) p_{θ,t_i}(x_{t_i})`` with ``τ`` between two step times, and
Eq. 8 / Eq. 10 then train the fake model on "the clean sample corresponding to ``x_{t_i}``" and on
``x_{t_i}`` itself. TDM's reference training script (``train_tdm_demo.py``) does this: from the
stored state ``x_{t_k}`` the student predicts ``(ε̂, x̂0_k)``; the point of its own deterministic step
at the interval's lower end, ``α_s·x̂0_k + σ_s·ε̂`` with ``s = t_{k+1}`` (``add_noise(model_latents,
model_eps, timesteps_mid)``), is diffused with the forward kernel ``q(x_τ | x_s)``
(``Predictor.add_noise(…, t_mid, τ)``) to ``τ`` drawn in ``[t_{k+1}, t_k]`` (``--use_separate``);
the fake model regresses ``x̂0_k`` from that ``x_τ`` with weight ``min(SNR_τ, 5)``. So the diffused
sample is **the state the step lands on**, ``x_{t_{k+1}}`` — neither the step's input ``x_{t_k}``
nor (except at the last step, where it *is* ``x̂0_{K−1}``) the clean prediction. Here that state
is whatever the run's sampler makes of the step (:meth:`StudentGenerator.step
<fewstep.objectives.student.StudentGenerator.step>`): ``euler`` is TDM's deterministic step exactly;
for ``consistency`` (``α_s·x̂0_k + σ_s·z``) the diffused state is, in law, ``α_τ·x̂0_k + σ_τ·ε``,
so both readings agree. The fake model's target is ``x̂0_k`` (Eq. 8) or, Eq. 10's velocity,
``ε − x̂0_k`` with ``ε = (x_τ − α_τ·x̂0_k)/σ_τ`` the noise ``x_τ`` carries around ``x̂0_k``.
(TDM's extra importance weight for the deterministic step's non-Gaussian ``ε`` is left out: for a
consistency student ``ε`` is exactly Gaussian.)

**The generator's term (kind ``tdm``, role student).** At ``x_τ`` both scores are evaluated
without gradients and the student is pushed along their difference through the Pseudo-Huber
distance ``d(Δ) = √(‖Δ‖² + c²) − c``, ``c = 0.00054·√d`` (Eq. 7, 9; iCT's constant), summed over
the K steps::

    Δ = s_fake(x_τ) − s_real(x_τ)                  score form, Eq. 5–7 (Prediction.score)
    Δ = σ_τ·(v_real(x_τ) − v_fake(x_τ))            flow form, Eq. 9 (v = ε − x0, Prediction.flow)
    loss = Σ_k d(x_τ − sg(x_τ − Δ))               value d(Δ), ∂/∂x_τ = Δ / √(‖Δ‖² + c²)

so ``∇_θ loss = Σ_k Δ/√(‖Δ‖²+c²) · ∂x_τ/∂θ`` — Eq. 5's KL gradient ``(s_θ − s_φ)·∂G/∂θ`` with
Eq. 7's Pseudo-Huber weight: for ``‖Δ‖ ≫ c`` the distance is ‖Δ‖ and the push the unit direction
``Δ/‖Δ‖``, for ``‖Δ‖ ≪ c`` it is ``‖Δ‖²/2c`` (Eq. 6) and the push Eq. 5's ``Δ``, over c. Both forms
point the same way: ``σ(v_real − v_fake) = (α + σ)·(x0_fake − x0_real)`` and ``s_fake − s_real =
α/σ²·(x0_fake − x0_real)``; Eq. 9 writes ``σ(v_ψ − v_φ)``, whose norm is the same, but ``v = dx/dσ``
points toward noise, so descent follows ``σ(v_real − v_fake)``. The real score is the teacher with
CFG ``uncond + w·(cond − uncond)`` (TDM's ``--cfg``), the fake one the ``fake_score`` role without.
``∂x_τ/∂θ`` is autograd's through ``x_τ = (α_τ/α_s)·x_s + …`` (TDM applies its x0-space difference
to ``x̂0_k`` directly: the same direction, another positive per-sample scale); ``backprop: last``
(TDM) detaches each step's input state, so step k trains through its own network call only;
``all`` backpropagates through every earlier step as well.

**Which steps (``steps``).** ``all`` sums the K per-step terms for every sample (Eq. 3's sum over
the trajectory). ``random`` trains each sample at one step ``k ~ U{0, …, K−1}`` (TDM's per-sample
random stage), its term scaled by K, so that the expectation over ``k`` is the same sum; the
teacher (with CFG, two calls) and the fake score are then evaluated on each sample once instead
of K times. The student still runs every step for every sample (its states are shared by the
batch), so the saving is three of the four network calls per sample and step.

**The fake score (kind ``tdm_fake_score``, role fake_score)**, Eq. 8 / Eq. 10 on the same
construction (its own draws of ``τ`` and the kernel noise), summed over the steps::

    score form:  ω_τ · mean (μ_ψ(x_τ, τ) − x̂0_k)²              ω_τ = min(SNR_τ, snr_cap) (TDM: 5)
    flow form:   ω_τ · mean (v_ψ(x_τ, τ) − (ε − x̂0_k))²        ω_τ = 1 (the plain flow-matching loss)

``form: auto`` is ``flow`` for a flow-matching schedule, else ``score``. ``τ`` is uniform in
``[max(t_{k+1}, tau_min), min(t_k, tau_max)]`` (TDM keeps 20/1000 from 0 and 10/1000 below t_k).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..diffusion.parameterization import Prediction
from ..errors import UserError
from .base import Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext, register_objective
from .student import Backprop, StudentSample, student_generator

Form = Literal["auto", "score", "flow"]

#: RGTD Eq. 7 (iCT, Song & Dhariwal 2023): c = HUBER_SCALE·√d for d dimensions.
HUBER_SCALE = 0.00054


# ---------------------------------------------------------------------------------------------
# Eq. 7 / Eq. 9: the Pseudo-Huber distance and the direction it weighs
# ---------------------------------------------------------------------------------------------

def huber_c(dims: int) -> float:
    """Eq. 7's ``c = 0.00054·√d`` for samples of ``d`` dimensions."""
    return HUBER_SCALE * math.sqrt(dims)


def pseudo_huber(delta: Tensor, c: float) -> Tensor:
    """Eq. 7: ``√(‖δ‖² + c²) − c`` per sample, ``δ (B, ...) → (B,)``; in at least float32."""
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    return (delta.flatten(1).pow(2).sum(1) + c * c).sqrt() - c


def pseudo_huber_surrogate(x: Tensor, delta: Tensor, c: float) -> Tensor:
    """``d(x − sg(x − Δ))`` per sample (B,): value ``d(Δ)``, gradient ``Δ/√(‖Δ‖² + c²)`` w.r.t. ``x``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, delta = x.to(dtype), delta.to(dtype)
    return pseudo_huber(x - (x - delta).detach(), c)


def resolve_form(form: Form, schedule) -> Literal["score", "flow"]:
    """``auto`` → ``flow`` on a flow-matching schedule, else ``score``."""
    if form != "auto":
        return form
    return "flow" if schedule.name == "flow" else "score"


def score_difference(real: Prediction, fake: Prediction, form: Literal["score", "flow"]) -> Tensor:
    """The direction Δ the generator is pushed along at ``x_τ`` (module doc): ``s_fake − s_real`` (Eq. 5–7) or
    ``σ_τ·(v_real − v_fake)`` (Eq. 9). (B, C, T, H, W)."""
    if form == "score":
        return fake.score - real.score
    return real.sigma * (real.flow - fake.flow)


# ---------------------------------------------------------------------------------------------
# The step intervals and the diffused states
# ---------------------------------------------------------------------------------------------

def step_interval(times: Tensor, k: int, tau_min: float, tau_max: float) -> tuple[float, float, float]:
    """``(s, lo, hi)`` of step ``k`` of a generator with step times ``times`` (K,) decreasing: the time
    ``s = t_{k+1}`` (0 after the last step) its state lands at, and the range ``[lo, hi]`` of τ."""
    s = float(times[k + 1]) if k + 1 < len(times) else 0.0
    lo, hi = max(s, tau_min), min(float(times[k]), tau_max)
    if not lo < hi:
        raise UserError(f"step {k} of the generator spans t = {s:.4g} … {float(times[k]):.4g}, which leaves no τ "
                        f"within tau_min = {tau_min}, tau_max = {tau_max}; widen them or use other generator times")
    return s, lo, hi


def diffuse_step(schedule, x_s: Tensor, s: float, lo: float, hi: float, ctx: StepContext,
                 name: str) -> tuple[Tensor, Tensor]:
    """``(x_τ, τ)``: ``τ ~ U[lo, hi]`` per sample and ``x_τ ~ q(x_τ | x_s)`` (Schedule.diffuse), drawn as ``name``."""
    tau = (lo + ctx.rand(f"{name}/tau") * (hi - lo)).to(x_s.dtype)  # (B,)
    z = ctx.randn(tuple(x_s.shape[1:]), f"{name}/z", dtype=x_s.dtype)  # (B, C, T, H, W)
    return schedule.diffuse(x_s, s, tau, z), tau


def landing_states(sample: StudentSample) -> list[Tensor]:
    """The state each step of a sample lands on: ``x_{t_1}, …, x_{t_{K−1}}``, then ``x̂0`` (K × (B, C, T, H, W))."""
    return [*sample.states[1:], sample.x0]


class _IntervalConfig(ObjectiveConfig):
    """Keys both TDM objectives have."""

    SAMPLES_STUDENT: ClassVar[bool] = True
    form: Form = Field("auto", description="score (Eq. 5–8) or flow (Eq. 9–10); auto: flow on a flow-matching "
                                           "schedule, else score")
    tau_min: float = Field(0.02, ge=0, lt=1, description="lower bound of τ (TDM: 20/1000)")
    tau_max: float = Field(0.98, gt=0, le=1, description="upper bound of τ (TDM: 10/1000 below t_k)")

    @model_validator(mode="after")
    def _check_tau(self):
        if not self.tau_min < self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be below tau_max ({self.tau_max})")
        return self


# ---------------------------------------------------------------------------------------------
# The objectives
# ---------------------------------------------------------------------------------------------

class TDMConfig(_IntervalConfig):
    kind: Literal["tdm"] = "tdm"
    backprop: Backprop = Field("last", description="'last': each step trains through its own network call (TDM); "
                                                   "'all': through every earlier step too")
    real_cfg_scale: float | None = Field(4.5, description="teacher CFG w in uncond + w·(cond − uncond) (TDM's "
                                                          "--cfg 4.5); null = none")
    huber_c: float | None = Field(None, gt=0, description="c of the Pseudo-Huber distance; null = 0.00054·√d")
    steps: Literal["all", "random"] = Field("all", description="'all': every sample trains at all K steps (Eq. 3's "
                                            "sum); 'random': at one step drawn per sample, its term × K (TDM)")
    teacher: RoleName = Field("teacher", description="the role giving the real score (frozen)")
    fake_score: RoleName = Field("fake_score", description="the role giving the fake score")

    def reads(self) -> set[str]:
        return {self.teacher, self.fake_score}


@register_objective
class TDM(Objective):
    """RGTD Eq. 3–9 (TDM): Pseudo-Huber score matching at every step's diffused landing state (module doc)."""

    kind = "tdm"
    Config = TDMConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        cfg = self.config
        student, teacher, fake = roles[self.role].module, roles[cfg.teacher].module, roles[cfg.fake_score].module
        generator = student_generator(ctx)
        if cfg.backprop == "all":
            sample = generator.sample(student, batch, ctx, role=self.role, backprop="all")
            landed = landing_states(sample)
        else:  # TDM: the states without a graph, then each step again from its detached input
            with torch.no_grad():
                sample = generator.sample(student, batch, ctx, role=self.role)
            landed = None
        form = resolve_form(cfg.form, teacher.schedule)
        c = cfg.huber_c if cfg.huber_c is not None else huber_c(sample.x0[0].numel())
        K, B = len(sample.times), len(batch)
        chosen = (ctx.rand("tdm/step") * K).long().clamp(max=K - 1) if cfg.steps == "random" else None  # (B,)
        total, metrics = sample.x0.new_zeros(B, dtype=torch.promote_types(sample.x0.dtype, torch.float32)), {}
        for k in range(K):
            rows = torch.arange(B, device=total.device) if chosen is None else (chosen == k).nonzero().flatten()
            if len(rows) == 0:
                continue
            s, lo, hi = step_interval(sample.times, k, cfg.tau_min, cfg.tau_max)
            if landed is None:
                x_s = generator.step(student, sample.states[k].detach(), k, batch, ctx, role=self.role)[1]
            else:
                x_s = landed[k]  # (B, C, T, H, W) x_{t_{k+1}}, in the graph
            x_tau, tau = diffuse_step(student.schedule, x_s, s, lo, hi, ctx, f"tdm/{k}")
            x_tau, tau = x_tau[rows], tau[rows]  # (n, C, T, H, W), (n,): the samples trained at step k
            with torch.no_grad():
                cond, uncond = batch.cond.index(rows), batch.uncond.index(rows)
                real = teacher.predict(x_tau.detach(), tau, cond, cfg_scale=cfg.real_cfg_scale, uncond=uncond)
                delta = score_difference(real, fake.predict(x_tau.detach(), tau, cond), form)
            term = pseudo_huber_surrogate(x_tau, delta, c)  # (n,)
            metrics[f"step{k}"] = float(term.detach().mean())
            total = total.index_add(0, rows, term * (1 if chosen is None else K))
        metrics["huber_c"] = c
        return self.output({"traj": total}, metrics)


class TDMFakeScoreConfig(_IntervalConfig):
    kind: Literal["tdm_fake_score"] = "tdm_fake_score"
    role: RoleName = Field("fake_score", description="the fake score model μ_ψ / v_ψ being trained")
    generator: RoleName = Field("student", description="the role whose trajectories the fake score models")
    weighting: Literal["min_snr", "uniform"] | None = Field(
        None, description="ω_τ: min(SNR_τ, snr_cap) (TDM's code) or 1; null: min_snr for the score form, uniform "
                          "for the flow form")
    snr_cap: float = Field(5.0, gt=0, description="the cap of min_snr (TDM: 5)")

    def reads(self) -> set[str]:
        return {self.generator}


@register_objective
class TDMFakeScore(Objective):
    """RGTD Eq. 8 (score form) / Eq. 10 (flow form) on every step's diffused landing state (module doc)."""

    kind = "tdm_fake_score"
    Config = TDMFakeScoreConfig

    def omega(self, schedule, tau: Tensor, form: str) -> Tensor:
        """``ω_τ`` (B,)."""
        weighting = self.config.weighting or ("min_snr" if form == "score" else "uniform")
        if weighting == "uniform":
            return torch.ones_like(tau)
        snr = (schedule.alpha(tau) / schedule.sigma(tau)) ** 2
        return snr.clamp(max=self.config.snr_cap)

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        cfg = self.config
        fake, student = roles[self.role].module, roles[cfg.generator].module
        with torch.no_grad():  # sg(G_θ): the same ε as the generator's own objectives
            sample = student_generator(ctx).sample(student, batch, ctx, role=cfg.generator)
        form = resolve_form(cfg.form, fake.schedule)
        losses, metrics = [], {}
        for k, x_s in enumerate(landing_states(sample)):
            s, lo, hi = step_interval(sample.times, k, cfg.tau_min, cfg.tau_max)
            with torch.no_grad():
                x_tau, tau = diffuse_step(fake.schedule, x_s, s, lo, hi, ctx, f"tdm_fake/{k}")
                alpha, sigma = fake.schedule.coefficients(tau, x_tau)
                target = Prediction.from_output("x0", sample.x0_predictions[k], x_tau, alpha, sigma)  # x̂0_k, ε
            pred = fake.predict(x_tau, tau, batch.cond)
            out, want = (pred.x0, target.x0) if form == "score" else (pred.flow, target.flow)
            dtype = torch.promote_types(out.dtype, torch.float32)
            mse = (out.to(dtype) - want.to(dtype)).pow(2).flatten(1).mean(1)  # (B,)
            losses.append(self.omega(fake.schedule, tau, form).to(dtype) * mse)
            metrics[f"step{k}"] = float(losses[-1].detach().mean())
        return self.output({"mse": torch.stack(losses).sum(0)}, metrics)
