"""Adversarial training on frozen-teacher features (AccVideo, papers/002, §4.3, Eq. 7–8, Alg. 1).

Pieces, then the two objectives:

* :func:`teacher_features` — the frozen feature extractor: hidden tokens of a denoiser's
  transformer block (:func:`fewstep.models.features.extract_features`) laid out on the token grid
  ``(B, D, T', H', W')``. AccVideo Fig. 6: the last block for ``t'_k > 0`` ("the 60th layer") and an
  earlier one at ``t'_0 = 0`` ("the 40th", i.e. 2/3 of the depth — our default ``clean_block``).
* :class:`TimestepHeads` — the discriminator role: m timestep-aware projection heads
  ``H_0 … H_{m−1}``, each a :class:`~fewstep.objectives.gan.FrameHead` (a small 2D CNN over every
  frame of the feature grid, averaged to one logit per sample) (Eq. 8: ``D(l, t'_k) =
  H_k(v_θ(l, t'_k))``). ``single_head`` shares one head across timesteps (the §5.2 ablation).
* the GAN losses of Eq. 7 and the hinge form (RGTD Eq. 11–12) from :mod:`fewstep.objectives.gan`.
* :class:`LatentQueues` — ``Q_0 … Q_m``, FIFO queues of student latents at each key time with
  their captions (Alg. 1 l. 3, 11–17), saved with checkpoints.

**Eq. 7** is the standard GAN, ``min_β max_φ E[log D(l') + log(1 − D(l^gen))]`` with
``D = sigmoid(logit)``. The discriminator minimises ``softplus(−d_real) + softplus(d_fake)``
(exactly ``−log D(l') − log(1 − D(l^gen))``). For the generator, ``loss: minimax`` is Eq. 7 taken
literally, ``log(1 − D(l^gen)) = −softplus(d_fake)``; the default ``non_saturating`` is
``−log D(l^gen) = softplus(−d_fake)``, the form Goodfellow et al. — whom §4.3 cites for "the standard
GAN" — recommend in practice (same fixed point, no vanishing gradient while D wins). ``hinge`` is
``relu(1 − d_real) + relu(1 + d_fake)`` / ``−d_fake`` (RGTD Eq. 11–12).

**Alg. 1 as two objectives.** One engine step is one pass of Alg. 1's inner loop, with k cycling
``m−1, m−2, …, 0`` over consecutive steps (l. 5; all micro-batches of a step share k):

1. at ``k = m−1`` fresh noise ``z`` for the batch enters ``Q_m`` with the batch's captions (l. 11–12);
2. the oldest ``B`` latents ``l^gen_{t'_{k+1}}`` leave ``Q_{k+1}`` (l. 15) and take *one* student
   Euler step to ``t'_k`` (l. 16, Eq. 5); the result enters ``Q_k`` (l. 17);
3. ``queue_gan_generator`` (role student, weight λ_adv): the generator loss of
   ``D(l^gen_{t'_k}, t'_k)`` — differentiated through that last Euler step and through the frozen
   teacher's features, but not into the heads (they enter with detached parameters);
   ``queue_gan_discriminator`` (role discriminator): the discriminator loss of the real key latents
   ``l'_{t'_k}`` of the batch (from the store; ``source: forward`` diffuses data latents instead,
   as in the trajectory objective) against the detached ``l^gen_{t'_k}`` — only head ``H_k`` is used
   (and so updated) in the step, as in l. 22.

Each objective keeps its *own* queues and regenerates its step-2 latents with the student as it is
when it runs — the project's rule for shared samples (:mod:`fewstep.objectives.student`): no
objective hands tensors to another. Both draw ``z`` as the student role under the same name, so
the two queue sets start the same chains (same noise, same captions); the discriminator's copy
takes each Euler step with the student as updated earlier in that engine step (Alg. 1 updates β
and H_k from one L_adv; the engine updates the roles one after the other). If ``Q_{k+1}`` holds
fewer than ``B`` latents (after a change of batch size or cadence, or a queue trimmed to
``queue_size``), the missing ones are solved from fresh noise with the student down to
``t'_{k+1}`` — the slow path the queues exist to avoid, but exact. Queue contents and the cycle
position are the objective's ``state_dict``, so a resumed run continues exactly. In multi-process
training each rank keeps its own queues; a checkpoint stores rank 0's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..diffusion.samplers import euler_step, sample_euler
from ..models.backbones import Conditioning
from ..models.features import clean_block, extract_features, token_grid
from .base import Batch, Objective, ObjectiveOutput, RoleName, Roles, StepContext, register_objective
from .gan import FrameHead, GANLoss, discriminator_loss, generator_loss
from .trajectory import KeyTimesConfig, key_grid, key_latents, stored_times


# ---------------------------------------------------------------------------------------------
# The frozen feature extractor
# ---------------------------------------------------------------------------------------------

class FeatureConfig(StrictModel):
    """Where discriminator features come from (AccVideo Eq. 8, Fig. 6)."""

    role: RoleName = Field("teacher", description="the frozen denoiser v_θ used as feature extractor")
    block: int = Field(-1, description="block whose output is the feature at t > 0 (AccVideo: the last)")
    clean_block: int | None = Field(None, description="block at t = 0; null = the block at 2/3 of the depth "
                                                      "(AccVideo: the 40th of 60)")


def teacher_features(denoiser, x_t: Tensor, t: Tensor, cond: Conditioning, config: FeatureConfig) -> Tensor:
    """Features ``(B, D, T', H', W')`` of ``x_t`` at times ``t`` (B,): ``block`` where t > 0, ``clean_block`` at 0."""
    clean = config.clean_block if config.clean_block is not None else clean_block(denoiser)
    noisy, clean_feats = extract_features(denoiser, x_t, t, cond, [config.block, clean])  # (B, N, D) each
    tokens = torch.where((t == 0).reshape(-1, 1, 1), clean_feats, noisy)
    gt, gh, gw = token_grid(denoiser, x_t.shape, tokens.shape[1])
    return rearrange(tokens, "b (t h w) d -> b d t h w", t=gt, h=gh, w=gw)


# ---------------------------------------------------------------------------------------------
# The discriminator heads
# ---------------------------------------------------------------------------------------------

class TimestepHeads(nn.Module):
    """AccVideo Eq. 8's projection heads: ``logit = H_k(features)`` with one :class:`FrameHead` per key timestep.

    ``forward(features (B, D, T', H', W'), k (B,) int64) -> (B,)``: sample b uses head ``k[b]``
    (head 0 for every sample when ``single_head``).
    """

    def __init__(self, channels: int, timesteps: int, width: int = 64, single_head: bool = False):
        super().__init__()
        self.timesteps, self.single_head = timesteps, single_head
        self.heads = nn.ModuleList([FrameHead(channels, width) for _ in range(1 if single_head else timesteps)])

    def head_index(self, k: Tensor) -> Tensor:
        """Which head each sample's timestep index uses."""
        if bool(((k < 0) | (k >= self.timesteps)).any()):
            raise ValueError(f"timestep index {k.tolist()} out of range 0..{self.timesteps - 1}")
        return torch.zeros_like(k) if self.single_head else k

    def forward(self, features: Tensor, k: Tensor) -> Tensor:
        head = self.head_index(k)
        logits = features.new_zeros(features.shape[0])
        for i in head.unique().tolist():
            rows = head == i
            logits = logits.index_put((rows,), self.heads[i](features[rows]))
        return logits  # (B,)


# ---------------------------------------------------------------------------------------------
# The latent queues
# ---------------------------------------------------------------------------------------------

class LatentQueues:
    """``Q_0 … Q_m`` (AccVideo Alg. 1 l. 3): FIFO queues of latents ``(n, C, T, H, W)`` at key times
    ``t'_0 … t'_m`` with their captions; each keeps at most ``capacity`` entries (oldest dropped)."""

    def __init__(self, m: int, capacity: int):
        self.capacity = capacity
        self.latents: list[Tensor | None] = [None] * (m + 1)
        self.conds: list[Conditioning | None] = [None] * (m + 1)

    def __len__(self) -> int:
        return len(self.latents)

    def size(self, j: int) -> int:
        return 0 if self.latents[j] is None else len(self.latents[j])

    def push(self, j: int, latents: Tensor, cond: Conditioning) -> None:
        """Append ``latents`` (n, C, T, H, W) with ``cond`` (batch n) to ``Q_j``."""
        latents = latents.detach()
        cond = Conditioning(cond.context.detach(), cond.mask if cond.mask is not None else
                            torch.ones(cond.context.shape[:2], dtype=torch.bool, device=cond.context.device),
                            {k: v.detach() for k, v in cond.extra.items()})
        if self.latents[j] is not None:
            latents = torch.cat([self.latents[j].to(latents.device), latents])
            cond = Conditioning.cat([self.conds[j].to(device=latents.device), cond])
        keep = slice(max(0, len(latents) - self.capacity), None)
        self.latents[j], self.conds[j] = latents[keep], cond.index(keep)

    def pop(self, j: int, n: int) -> tuple[Tensor, Conditioning] | None:
        """The oldest ``min(n, size)`` entries of ``Q_j`` (None when empty), removed from it."""
        if self.size(j) == 0:
            return None
        out = self.latents[j][:n], self.conds[j].index(slice(0, n))
        rest = slice(n, None)
        self.latents[j], self.conds[j] = self.latents[j][rest], self.conds[j].index(rest)
        if self.size(j) == 0:
            self.latents[j] = self.conds[j] = None
        return out

    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for j, (x, c) in enumerate(zip(self.latents, self.conds)):
            if x is not None:
                state |= {f"q{j}/latents": x, f"q{j}/context": c.context, f"q{j}/mask": c.mask,
                          **{f"q{j}/extra.{k}": v for k, v in c.extra.items()}}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for j in range(len(self)):
            if f"q{j}/latents" not in state:
                self.latents[j] = self.conds[j] = None
                continue
            extra = {key.split("extra.", 1)[1]: v for key, v in state.items() if key.startswith(f"q{j}/extra.")}
            self.latents[j] = state[f"q{j}/latents"]
            self.conds[j] = Conditioning(state[f"q{j}/context"], state[f"q{j}/mask"], extra)


# ---------------------------------------------------------------------------------------------
# AccVideo's objectives
# ---------------------------------------------------------------------------------------------

class QueueGANConfig(KeyTimesConfig):
    """Keys both queue-GAN objectives have (the key times are the generator's, as for trajectory_guidance)."""

    loss: GANLoss = Field("non_saturating", description="GAN loss form (module doc)")
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    queue_size: int = Field(64, ge=1, description="capacity of each latent queue Q_j")


class QueueGANGeneratorConfig(QueueGANConfig):
    kind: Literal["queue_gan_generator"] = "queue_gan_generator"
    discriminator: RoleName = Field("discriminator", description="the role holding the heads H_k")

    @property
    def roles(self) -> tuple[str, str]:
        """``(generator, discriminator)``: whose latents fill the queues, who holds the heads."""
        return self.role, self.discriminator

    def reads(self) -> set[str]:
        return {self.features.role, self.discriminator}


class QueueGANDiscriminatorConfig(QueueGANConfig):
    kind: Literal["queue_gan_discriminator"] = "queue_gan_discriminator"
    role: RoleName = Field("discriminator", description="the role holding the heads H_k")
    generator: RoleName = Field("student", description="the role whose latents fill the queues")

    @property
    def roles(self) -> tuple[str, str]:
        """``(generator, discriminator)``: whose latents fill the queues, who holds the heads."""
        return self.generator, self.role

    def reads(self) -> set[str]:
        return {self.features.role, self.generator}


class _QueueGAN(Objective):
    """Shared by both objectives: the queues, Alg. 1's k cycle, one Euler step of fakes, D's logits."""

    def __init__(self, config: QueueGANGeneratorConfig | QueueGANDiscriminatorConfig, name: str):
        super().__init__(config, name)
        self.student_role, self.heads_role = config.roles
        self.m = 0  # the generator's steps: known at the first call (queues built then)
        self.queues: LatentQueues | None = None
        self._pending: dict[str, Tensor] | None = None  # queue state loaded before the first call
        self.steps_seen, self.last_step = 0, -1  # engine steps this objective has run; the last one

    def _start(self, m: int) -> None:
        """Build ``Q_0 … Q_m`` for an m-step generator (and restore a checkpoint's queues)."""
        if self.queues is None:
            self.m, self.queues = m, LatentQueues(m, self.config.queue_size)
            if self._pending is not None:
                self.queues.load_state_dict(self._pending)
                self._pending = None
        elif m != self.m:
            raise ValueError(f"the generator has {m} steps but the queues were built for {self.m}")

    # -- Alg. 1 ----------------------------------------------------------------------------------
    def segment(self, ctx: StepContext) -> int:
        """l. 5: ``k = m−1, m−2, …, 0, m−1, …`` — one value per engine step."""
        if ctx.step != self.last_step:
            self.steps_seen, self.last_step = self.steps_seen + 1, ctx.step
        return self.m - 1 - (self.steps_seen - 1) % self.m

    def fakes(self, batch: Batch, roles: Roles, ctx: StepContext, times: Tensor, *,
              grad: bool) -> tuple[Tensor, Conditioning, int]:
        """``(l^gen_{t'_k}, its captions, k)`` by Alg. 1 l. 11–17; ``times`` (m + 1,) increasing (t'_0 first)."""
        student = roles[self.student_role].module
        self._start(len(times) - 1)
        k, B = self.segment(ctx), len(batch)
        shape, dtype = tuple(batch.latents.shape[1:]), batch.latents.dtype
        as_student = replace(ctx, role=self.student_role)  # both objectives draw the same z
        if k == self.m - 1:  # l. 11–12: a new cycle starts from noise
            self.queues.push(self.m, as_student.randn(shape, "queue/z", dtype=dtype), batch.cond)
        popped = self.queues.pop(k + 1, B)  # l. 15: l^gen_{t'_{k+1}}
        x, cond = (popped[0].to(batch.latents.device), popped[1].to(device=batch.latents.device)) if popped \
            else (batch.latents[:0], batch.cond.index(slice(0, 0)))
        if len(x) < B:  # refill: solve fresh noise down to t'_{k+1} with the student (exact, slow)
            rest = slice(len(x), B)
            z = as_student.randn(shape, "queue/refill", dtype=dtype)[rest]
            path = times.flip(0)[: self.m - k]  # t'_m … t'_{k+1}
            if len(path) > 1:
                with torch.no_grad():
                    z = sample_euler(student, z, path, batch.cond.index(rest)).x
            x, cond = torch.cat([x, z]), Conditioning.cat([cond, batch.cond.index(rest)])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):  # l. 16: one Euler step (Eq. 5)
            pred = student.predict(x, times[k + 1].to(dtype), cond)
            l_gen = euler_step(pred, *student.schedule.coefficients(times[k].to(dtype), x))
        self.queues.push(k, l_gen, cond)  # l. 17
        return l_gen, cond, k

    def logits(self, roles: Roles, x: Tensor, t: Tensor, cond: Conditioning, k: int, *,
               detach_heads: bool = False) -> Tensor:
        """``D(x, t'_k) = H_k(features(x, t'_k))`` per sample (B,) (Eq. 8)."""
        teacher, heads = roles[self.config.features.role].module, roles[self.heads_role].module
        t_b = t.to(x.dtype).expand(x.shape[0])  # (B,)
        feats = teacher_features(teacher, x, t_b, cond, self.config.features)  # (B, D, T', H', W')
        head = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        if detach_heads:  # D as a fixed function of its input: no gradient into the heads
            params = {n: p.detach() for n, p in heads.named_parameters()}
            return torch.func.functional_call(heads, params, (feats, head))
        return heads(feats, head)

    # -- persistent state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        queues = self.queues.state_dict() if self.queues is not None else (self._pending or {})
        return {**queues, "cycle": torch.tensor([self.steps_seen, self.last_step], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        queues = {k: v for k, v in state.items() if k != "cycle"}
        if self.queues is not None:
            self.queues.load_state_dict(queues)
        else:
            self._pending = queues
        self.steps_seen, self.last_step = (int(v) for v in state["cycle"])


@register_objective
class QueueGANGenerator(_QueueGAN):
    """AccVideo Eq. 7 for the student (Alg. 1 l. 11–21): fool H_k with one Euler step of queued latents."""

    kind = "queue_gan_generator"
    Config = QueueGANGeneratorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        grid, _ = key_grid(ctx, roles[self.student_role].module.schedule, stored_times(batch, self.config.source))
        times = grid.flip(0).to(batch.latents.device)  # (m + 1,) increasing: t'_0 … t'_m
        l_gen, cond, k = self.fakes(batch, roles, ctx, times, grad=True)
        d_fake = self.logits(roles, l_gen, times[k], cond, k, detach_heads=True)  # (B,)
        loss = generator_loss(self.config.loss, d_fake)
        return self.output({"adv": loss}, {"k": k, "d_fake": float(d_fake.detach().mean())})


@register_objective
class QueueGANDiscriminator(_QueueGAN):
    """AccVideo Eq. 7 for the heads (Alg. 1 l. 20–22): real key latents against queued student latents."""

    kind = "queue_gan_discriminator"
    Config = QueueGANDiscriminatorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.student_role].module
        keys = key_latents(batch, self.config.source, ctx, student.schedule, "adv")
        with torch.no_grad():
            l_gen, cond, k = self.fakes(batch, roles, ctx, keys.times, grad=False)
        d_real = self.logits(roles, keys.latents[:, k], keys.times[k], batch.cond, k)  # (B,)
        d_fake = self.logits(roles, l_gen, keys.times[k], cond, k)  # (B,)
        loss = discriminator_loss(self.config.loss, d_real, d_fake)
        return self.output({"adv": loss}, {"k": k, "d_real": float(d_real.detach().mean()),
                                           "d_fake": float(d_fake.detach().mean())})
