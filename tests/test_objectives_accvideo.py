"""AccVideo's objectives: trajectory guidance (Eq. 6), the teacher-feature discriminator with
timestep-aware heads (Eq. 7–8), and the per-timestep latent queues (Alg. 1). The GAN losses are
tested in test_objectives_gan.py, the feature extraction in test_backbone_features.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.diffusion.samplers import euler_step, sample_euler
from fewstep.diffusion.schedules import FlowMatching
from fewstep.errors import UserError
from fewstep.models.backbones import Backbone
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.adversarial import (FeatureConfig, LatentQueues, QueueGANDiscriminator, QueueGANGenerator,
                                            TimestepHeads, teacher_features)
from fewstep.objectives.base import Batch
from fewstep.diffusion.schedules import TIME_GRIDS
from fewstep.objectives.student import select_times
from fewstep.objectives.trajectory import TrajectoryGuidance, key_grid
from helpers import F64, FakeRole, const_cond, make_tiny_pipeline, make_wan, model_time
import helpers

KEY_GRIDS = {"keys": TIME_GRIDS["accvideo_keys"], "uniform": TIME_GRIDS["accvideo_uniform"]}


def make_ctx(*args, **kwargs):
    """A step context with AccVideo's generator: Euler on the key times (``times`` to change them)."""
    return helpers.make_ctx(*args, **{"times": "accvideo_keys", "sampler": "euler", **kwargs})

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 1, 2, 2)  # (C, T, H, W)
KEYS = torch.tensor(KEY_GRIDS["keys"], dtype=F64)  # decreasing, t'_5 = 1 … t'_0 = 0


def trajectory_batch(b=6, times=KEYS, seed=0, dtype=F64):
    """A batch whose extras hold random 'stored trajectories' at ``times``."""
    g = torch.Generator().manual_seed(seed)
    path = torch.randn(b, len(times), *SHAPE, generator=g, dtype=dtype)  # (B, K, C, T, H, W)
    return Batch(latents=path[:, -1], cond=const_cond(b, 0.0, dtype), uncond=const_cond(b, 0.0, dtype),
                 prompts=["a red circle"] * b, sample_ids=torch.arange(b),
                 extra={"trajectory": path, "key_times": times.expand(b, -1)})


# ------------------------------------------------------------------------------------ Eq. 6
class ChordVelocity(Backbone):
    """A flow-velocity student that outputs ``(l_k − l_{k+1})/(σ_k − σ_{k+1}) + offset`` at the key
    latent ``l_{k+1}`` of each sample — the exact segment velocity when ``offset = 0``."""

    def __init__(self, schedule, path, times, offset=0.0):
        super().__init__()
        self.schedule, self.path, self.times, self.offset = schedule, path, times, offset

    def forward(self, x, timestep, cond):
        t = model_time(self.schedule, timestep)  # (B,)
        j = (self.times[None, :] - t[:, None]).abs().argmin(1)  # sampler-order index of t'_{k+1}
        rows = torch.arange(len(x))
        assert torch.equal(x, self.path[rows, j]), "the student must be evaluated on l_{t'_{k+1}}"
        sigma = self.schedule.sigma(self.times)
        chord = (self.path[rows, j + 1] - self.path[rows, j]) / (sigma[j + 1] - sigma[j]).reshape(-1, 1, 1, 1, 1)
        return chord + self.offset


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_guidance_is_zero_for_the_exact_segment_velocity(shift):
    sched = FlowMatching(shift=shift)  # with a shift the chord slope is in σ(t), not t
    batch = trajectory_batch()
    ctx = make_ctx(6)
    objective = TrajectoryGuidance(TrajectoryGuidance.Config(), "traj")
    exact = Denoiser(ChordVelocity(sched, batch.extra["trajectory"], KEYS), sched, "flow")
    out = objective(batch, {"student": FakeRole("student", exact)}, ctx)
    assert out.losses["traj"].shape == (6,) and float(out.losses["traj"].max()) < 1e-20
    # a velocity off by c everywhere costs exactly c² (Eq. 6 in velocity units)
    off = Denoiser(ChordVelocity(sched, batch.extra["trajectory"], KEYS, offset=0.3), sched, "flow")
    torch.testing.assert_close(objective(batch, {"student": FakeRole("student", off)}, ctx).losses["traj"],
                               torch.full((6,), 0.09, dtype=F64))
    # the segments are drawn per sample from ctx: the same sample gets the same k in any batch
    k_all = (ctx.rand("traj/k") * 5).long()
    assert len(k_all.unique()) > 1
    sub = make_ctx(1)
    sub.sample_ids = torch.tensor([3])
    assert (sub.rand("traj/k") * 5).long().item() == k_all[3].item()


class Zero(Backbone):
    def forward(self, x, timestep, cond):
        return torch.zeros_like(x)


def test_forward_source_is_flow_matching_at_the_key_times():
    """source: forward diffuses data latents with one fresh ε: every chord is ε − x0 (§3.2's setting)."""
    sched = FlowMatching(shift=3.0)
    x0 = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    batch = Batch(x0, const_cond(5, 0.0, F64), const_cond(5, 0.0, F64), ["x"] * 5, torch.arange(5))
    ctx = make_ctx(5, times="accvideo_uniform")
    objective = TrajectoryGuidance(TrajectoryGuidance.Config(source="forward"), "traj")
    roles = {"student": FakeRole("student", Denoiser(Zero(), sched, "flow"))}
    loss = objective(batch, roles, ctx).losses["traj"]
    eps = ctx.randn(SHAPE, "traj/eps", dtype=F64)
    torch.testing.assert_close(loss, (eps - x0).pow(2).flatten(1).mean(1))  # ‖0 − (ε − x0)‖²
    with pytest.raises(UserError, match="needs batches from a trajectory store"):
        TrajectoryGuidance(TrajectoryGuidance.Config(), "traj")(batch, roles, ctx)


def test_uniform_grid_selects_the_nearest_stored_times():
    from fewstep.data.trajectories import solver_grid

    stored = solver_grid(50)  # a --keep all store
    snapped = make_ctx(6, times="accvideo_uniform", stored=stored)  # generator.snap_to_data: true
    grid, index = key_grid(snapped, FlowMatching(), stored)
    assert torch.equal(stored[index], grid) and float((grid - torch.tensor(KEY_GRIDS["uniform"], dtype=F64))
                                                      .abs().max()) < 0.011
    assert torch.equal(key_grid(make_ctx(1, stored=stored), FlowMatching(), stored)[0], KEYS)
    with pytest.raises(UserError, match=r"no stored latent near t=0\.4.*--keep all"):
        select_times(KEYS, torch.tensor(KEY_GRIDS["uniform"], dtype=F64))  # a key-times-only store
    with pytest.raises(UserError, match="not all in the trajectory store.*snap_to_data"):  # unsnapped: refused
        key_grid(make_ctx(1, times="accvideo_uniform"), FlowMatching(), stored)
    batch = trajectory_batch(times=stored)
    out = TrajectoryGuidance(TrajectoryGuidance.Config(), "traj")(
        batch, {"student": FakeRole("student", Denoiser(Zero(), FlowMatching(), "flow"))}, snapped)
    assert torch.isfinite(out.losses["traj"]).all()


# ------------------------------------------------------------------------------------ features
def test_teacher_features_lie_on_the_token_grid():
    pipe = make_tiny_pipeline()
    teacher = pipe.denoiser
    x = torch.randn(pipe.latent_shape(3), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.5, 1.0])
    cond = pipe.encode_prompts(["a red circle moves left"] * 3)
    dit = teacher.backbone.module
    _, direct = dit(x, teacher.schedule.model_timestep(t), cond.context, context_mask=cond.mask,
                    return_features=[-1, 0])
    # the clean sample (t = 0) takes the block at 2/3 depth (depth 2 → block 0), the others the last
    feats = teacher_features(teacher, x, t, cond, FeatureConfig())
    assert feats.shape == (3, 32, 4, 2, 2)  # (B, D, T', H', W') for 4×4×4 latents, patch (1, 2, 2)
    torch.testing.assert_close(feats[0].flatten(1).T, direct[1][0])
    torch.testing.assert_close(feats[1:].flatten(2).transpose(1, 2), direct[0][1:])


def test_teacher_features_of_a_diffusers_backbone():
    wan = make_wan().eval()
    x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = const_cond(2, 0.5, torch.float32)
    cond.context = cond.context.expand(2, 6, 16).contiguous()
    feats = teacher_features(wan, x.requires_grad_(True), torch.tensor([0.3, 0.0]), cond, FeatureConfig())
    assert feats.shape == (2, 16, 2, 2, 2)  # Wan: hidden 2 heads × 8, patch (1, 2, 2)
    feats.square().sum().backward()  # gradients reach the input through the frozen network
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------ heads
def test_each_timestep_picks_its_own_head():
    torch.manual_seed(0)
    heads = TimestepHeads(channels=8, timesteps=5, width=8)
    feats = torch.randn(5, 8, 2, 3, 3)
    k = torch.tensor([4, 0, 2, 2, 1])
    logits = heads(feats, k)
    for b in range(5):  # by hand: head k[b] on every frame, averaged
        frames = feats[b].permute(1, 0, 2, 3)  # (T, D, H, W)
        torch.testing.assert_close(logits[b], heads.heads[int(k[b])].frames(frames).mean())
    logits.sum().backward()
    used = [i for i, h in enumerate(heads.heads) if h[0].weight.grad is not None]
    assert used == [0, 1, 2, 4]  # head 3 saw no sample: no gradient, no update (Alg. 1 l. 22)
    # the same features at different timesteps get different heads
    same = feats[:1].expand(5, -1, -1, -1, -1)
    assert len(heads(same, torch.arange(5)).unique()) == 5

    single = TimestepHeads(channels=8, timesteps=5, width=8, single_head=True)
    assert len(single.heads) == 1
    torch.testing.assert_close(single(same, torch.arange(5)), single(same, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="out of range"):
        heads(feats, torch.tensor([0, 1, 2, 3, 5]))


# ------------------------------------------------------------------------------------ queues
def test_queues_are_fifo_with_a_capacity(tmp_path):
    queues = LatentQueues(m=2, capacity=4)
    x = torch.arange(6.0).reshape(6, 1, 1, 1, 1)
    cond = const_cond(6, 0.0, torch.float32)
    cond.context = torch.arange(6.0).reshape(6, 1, 1)
    queues.push(1, x[:3], cond.index(slice(0, 3)))
    queues.push(1, x[3:], cond.index(slice(3, 6)))
    assert queues.size(1) == 4 and queues.size(0) == 0  # the two oldest were dropped
    out, c = queues.pop(1, 3)
    assert out.flatten().tolist() == [2.0, 3.0, 4.0] and c.context.flatten().tolist() == [2.0, 3.0, 4.0]
    assert queues.pop(0, 2) is None
    # state round trip through a safetensors file (what a checkpoint does)
    save_file({k: v.contiguous() for k, v in queues.state_dict().items()}, tmp_path / "q.safetensors")
    again = LatentQueues(m=2, capacity=4)
    again.load_state_dict(load_file(tmp_path / "q.safetensors"))
    out, c = again.pop(1, 5)  # fewer than asked: all there is
    assert out.flatten().tolist() == [5.0] and bool(c.mask.all()) and again.size(1) == 0


def accvideo_roles(single_head=False):
    pipe = make_tiny_pipeline()
    student = copy.deepcopy(pipe.denoiser)
    heads = TimestepHeads(channels=32, timesteps=5, width=8, single_head=single_head)
    return pipe, {"student": FakeRole("student", student), "discriminator": FakeRole("discriminator", heads),
                  "teacher": FakeRole("teacher", pipe.denoiser.requires_grad_(False), trainable=False)}


def store_batch(pipe, b=3, seed=0):
    """A batch as TrajectorySource serves it (random 'stored' paths at the key times)."""
    g = torch.Generator().manual_seed(seed)
    path = torch.randn(b, 6, *pipe.latent_shape(1)[1:], generator=g)
    prompts = ["a red circle moves left", "a blue square moves up", "a green cross stays still"][:b]
    return Batch(path[:, -1], pipe.encode_prompts(prompts), pipe.null_condition(b), prompts, torch.arange(b),
                 {"trajectory": path, "key_times": KEYS.expand(b, -1)})


def test_queues_advance_one_student_euler_step_per_step():
    pipe, roles = accvideo_roles()
    student = roles["student"].module
    gen = QueueGANGenerator(QueueGANGenerator.Config(), "adv_g")
    batch = store_batch(pipe)
    times = KEYS.flip(0)  # t'_0 … t'_5
    z = make_ctx(3, role="student").randn(tuple(batch.latents.shape[1:]), "queue/z")
    x = z
    for step, k in enumerate([4, 3, 2, 1, 0]):  # Alg. 1 l. 5: k = m−1 … 0 over consecutive steps
        ctx = make_ctx(3, step=step)
        ctx.role = "student"
        l_gen, cond, got_k = gen.fakes(batch, roles, ctx, times, grad=False)
        assert got_k == k and gen.segment(ctx) == k  # micro-batches of one step share k
        pred = student.predict(x, times[k + 1].float(), batch.cond)
        x = euler_step(pred, *student.schedule.coefficients(times[k].float(), x))  # one Euler step (Eq. 5)
        torch.testing.assert_close(l_gen, x)
        assert gen.queues.size(k) == 3 and gen.queues.size(k + 1) == 0  # moved from Q_{k+1} to Q_k
    # a full cycle is the student's 5-step Euler sample of z
    full = sample_euler(student, z, KEYS, batch.cond).x
    torch.testing.assert_close(gen.queues.latents[0], full)
    # step 5 starts the next cycle from fresh noise
    ctx = make_ctx(3, step=5)
    assert gen.fakes(batch, roles, ctx, times, grad=False)[2] == 4 and gen.queues.size(0) == 3


def test_queue_refill_and_state_round_trip(tmp_path):
    pipe, roles = accvideo_roles()
    student = roles["student"].module
    gen = QueueGANGenerator(QueueGANGenerator.Config(), "adv_g")
    times = KEYS.flip(0)
    gen.fakes(store_batch(pipe, b=2), roles, make_ctx(2, step=0), times, grad=False)  # Q_4 holds 2
    # a bigger batch at k = 3: 2 latents come from Q_4, the third is solved from fresh noise to t'_4
    batch = store_batch(pipe, b=3)
    ctx = make_ctx(3, step=1)
    l_gen, _, k = gen.fakes(batch, roles, ctx, times, grad=False)
    assert k == 3 and l_gen.shape[0] == 3
    z = ctx.randn(tuple(batch.latents.shape[1:]), "queue/refill")[2:]
    x4 = sample_euler(student, z, KEYS[:2], batch.cond.index(slice(2, 3))).x  # t'_5 → t'_4
    expected = euler_step(student.predict(x4, times[4].float(), batch.cond.index(slice(2, 3))),
                          *student.schedule.coefficients(times[3].float(), x4))
    torch.testing.assert_close(l_gen[2:], expected)

    # checkpoint → a fresh objective continues exactly
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, tmp_path / "adv.safetensors")
    resumed = QueueGANGenerator(QueueGANGenerator.Config(), "adv_g")
    resumed.load_state_dict(load_file(tmp_path / "adv.safetensors"))
    a = gen.fakes(batch, roles, make_ctx(3, step=2), times, grad=False)
    b = resumed.fakes(batch, roles, make_ctx(3, step=2), times, grad=False)
    assert a[2] == b[2] == 2
    torch.testing.assert_close(a[0], b[0])
    for j in range(6):
        assert gen.queues.size(j) == resumed.queues.size(j)


def test_generator_and_discriminator_gradients():
    pipe, roles = accvideo_roles()
    batch = store_batch(pipe)
    gen = QueueGANGenerator(QueueGANGenerator.Config(), "adv_g")
    out = gen(batch, roles, make_ctx(3))
    assert out.losses["adv"].shape == (3,) and out.metrics["k"] == 4
    out.losses["adv"].mean().backward()
    student, heads = roles["student"].module, roles["discriminator"].module
    assert all(p.grad is not None for p in student.parameters())  # through the Euler step and the teacher
    assert all(p.grad is None for p in heads.parameters())  # D enters as a fixed function
    assert all(p.grad is None for p in roles["teacher"].module.parameters())
    student.zero_grad(set_to_none=True)

    disc = QueueGANDiscriminator(QueueGANDiscriminator.Config(), "adv_d")
    out = disc(batch, roles, make_ctx(3, role="discriminator"))
    assert out.losses["adv"].shape == (3,) and out.metrics["k"] == 4
    # by hand: head 4 on the teacher features of the real key latent l'_{t'_4} and of the fake
    real = batch.extra["trajectory"][:, 1]  # sampler order: index 1 is t'_4 = 0.9651
    t = torch.full((3,), 0.9651)
    d_real = heads(teacher_features(roles["teacher"].module, real, t, batch.cond, FeatureConfig()),
                   torch.full((3,), 4))
    torch.testing.assert_close(out.metrics["d_real"], float(d_real.detach().mean()))
    out.losses["adv"].mean().backward()
    assert [i for i, h in enumerate(heads.heads) if h[0].weight.grad is not None] == [4]  # only H_k
    assert all(p.grad is None for p in student.parameters())  # the fakes are detached
    # the discriminator's queue copy holds the same chain as the generator's (same z, same student)
    torch.testing.assert_close(disc.queues.latents[4], gen.queues.latents[4])


def test_forward_source_needs_no_store():
    pipe, roles = accvideo_roles(single_head=True)
    x0 = torch.randn(pipe.latent_shape(2), generator=torch.Generator().manual_seed(3))
    batch = Batch(x0, pipe.encode_prompts(["a red circle moves left"] * 2), pipe.null_condition(2), ["p"] * 2,
                  torch.arange(2))
    disc = QueueGANDiscriminator(QueueGANDiscriminator.Config(source="forward"), "adv_d")
    gen = QueueGANGenerator(QueueGANGenerator.Config(source="forward"), "adv_g")
    for step in range(6):  # a whole cycle and the start of the next
        for objective, role in ((gen, "student"), (disc, "discriminator")):
            out = objective(batch, roles, make_ctx(2, role=role, step=step, times="accvideo_uniform"))
            assert torch.isfinite(out.losses["adv"]).all()
    assert disc.queues.size(0) == 2
