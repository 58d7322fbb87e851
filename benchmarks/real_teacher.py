"""A Wan2.1-T2V-1.3B-shaped teacher (random weights): sampling speed-up, DOLLAR step time, MFU and memory.

    python benchmarks/real_teacher.py --device cuda --size full --out runs/bench/real_teacher.json
    python benchmarks/real_teacher.py --device cpu --size reduced --threads 1 --compile --out runs/bench/cpu.json

The network is diffusers' ``WanTransformer3DModel`` built from the published config (:data:`WAN_1_3B`;
nothing is downloaded), wrapped as fewstep wraps a loaded Wan: ``Denoiser(WanBackbone(transformer),
FlowMatching(shift=3.0), "flow")``, conditioned on ``Conditioning(context, mask)``, zeros as the null
caption. ``full``: 480×832, 81 frames, latents ``(B, 16, 21, 60, 104)`` = 21·30·52 = 32760 tokens per
sample, text ``(B, 512, 4096)``, bf16. ``reduced`` (a CPU run of minutes): every width of the 1.3B model,
1 layer, latents ``(B, 16, 3, 16, 32)`` (384 tokens), 64 text tokens, fp32. ``tiny``: a narrow Wan for
the tests.

**(a) Sampling** (DOLLAR §4.1). Teacher: :func:`sample_euler`, uniform 50-step grid, CFG (one batched
[cond; uncond] pass per step: 100 NFE); student: :func:`sample_consistency` on ``dollar4``, no CFG
(4 NFE); the same network. Synchronised wall-clock of the sampling loop after a warm-up, teacher and
student interleaved ``--repeats`` times, median. ``--compile`` (default on CUDA) repeats it with
diffusers' regional ``torch.compile`` (``compile_repeated_blocks``), last, as it compiles in place.

**(b) DOLLAR step**: the real objectives of ``dollar.yaml``'s ``vsd`` preset on roles built by the
engine's :func:`~fewstep.engine.roles.build_roles`, a step where both roles update (every 5th step):
``student`` on :class:`~fewstep.objectives.distribution_matching.VSD` (``x̂ = G_θ(ε)``, 4 consistency
steps with gradients through all; teacher CFG and fake score at a random ``t`` without gradients;
backward), then ``fake_score`` on :class:`~fewstep.objectives.distribution_matching.FakeScoreLoss`
(``x̂`` regenerated without gradients; its flow-matching loss; backward), each followed by grad clipping
and fused AdamW, as ``Trainer.update_role``. Not included: CD (the recipe's default adds m = 5 CFG
teacher steps), EMA, data. bf16: teacher in bf16 (with the modules diffusers keeps in fp32), student
and full-copy fake score in fp32 master weights, objectives under bf16 autocast (``train.bf16``).

Model FLOPs, counted from the shapes (:func:`forward_flops`; multiply-add = 2): every linear layer,
attention ``QKᵀ`` and ``PV`` (self, and cross over the text). Backward = 2× forward for trained parts
and attention; 1× for layers reading the data (patch, text, time embeddings) and for a LoRA role's
frozen linears (input gradients only). Not counted: adapters' own FLOPs, softmax, norms, recomputation
under checkpointing (MFU, not hardware utilisation). MFU = FLOPs / time / dense bf16 peak of the GPU
(:data:`PEAK_BF16`, or ``--peak-tflops``); on a CPU, against a *measured* peak (best 2048³ matmul in the
run's dtype and threads). Tokens/s = latent patches per sample × batch / step time.

**(c) Memory** of that step: {full-copy, LoRA} fake score × {without, with} activation checkpointing
(``enable_gradient_checkpointing`` on the trained roles). LoRA: :func:`~fewstep.engine.lora.shared_copy`
of the teacher + :func:`~fewstep.engine.lora.add_lora` on its blocks' linears (base weights shared).
``peak_bytes``: CUDA ``max_memory_allocated`` during the step (weights, optimiser state, activations).
CPU: live tensor bytes before the step (distinct storages of the roles' parameters, buffers, optimiser
state, the batch) + the high-water mark of the allocator events ``torch.profiler`` records during it
(:func:`fewstep.bench.peak_memory`); not RSS: ``ru_maxrss`` is a process-lifetime maximum that cannot be
reset between set-ups, and the C allocator keeps freed pages. ``step_bytes`` = peak − allocated
before. A set-up that runs out of CUDA memory is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fewstep.bench import peak_memory
from fewstep.diffusion.samplers import sample_consistency, sample_euler
from fewstep.diffusion.schedules import FlowMatching, sampling_grid
from fewstep.engine.distributed import DistEnv, clip_grad_norm
from fewstep.engine.lora import LoraConfig, shared_copy
from fewstep.engine.roles import OptimConfig, RoleSpec, Roles, build_roles
from fewstep.models.backbones import Conditioning, WanBackbone
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.base import Batch, StepContext
from fewstep.objectives.distribution_matching import VSD, FakeScoreLoss
from fewstep.objectives.student import GeneratorConfig, StudentGenerator

#: Wan2.1-T2V-1.3B's transformer config (its ``transformer/config.json``).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: A narrow Wan of the same structure, for the tests.
TINY_WAN = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 32, "freq_dim": 32,
            "ffn_dim": 64, "num_layers": 1, "rope_max_seq_len": 32}


@dataclass(frozen=True)
class Size:
    wan: dict  # transformer config
    latent: tuple[int, int, int]  # (T, H, W) of the (B, 16, T, H, W) latents
    text_tokens: int
    lora_rank: int


SIZES = {
    "full": Size(WAN_1_3B, (21, 60, 104), 512, 16),  # 480×832, 81 frames
    "reduced": Size({**WAN_1_3B, "num_layers": 1}, (3, 16, 32), 64, 16),
    "tiny": Size(TINY_WAN, (3, 4, 4), 8, 4),
}
#: Dense bf16 peaks (FLOP/s) by a substring of ``torch.cuda.get_device_name``, first match wins.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))
CFG_SCALE = 5.0  # Wan 2.1 T2V's sampling guidance; in uncond + w·(cond − uncond)
STUDENT_TIMES = "dollar4"  # [999, 749, 499, 249], DOLLAR §4.1
SHIFT = 3.0  # Wan's flow shift at 480p


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def build_transformer(wan: dict, device: torch.device, seed: int) -> nn.Module:
    """A randomly initialised ``WanTransformer3DModel`` of config ``wan``, built on ``device`` in fp32."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        return WanTransformer3DModel(**wan).eval().requires_grad_(False)


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` except the submodules diffusers keeps in fp32 (``_keep_in_fp32_modules``),
    as ``from_pretrained(torch_dtype=dtype)`` loads it."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            want = torch.float32 if keep & set(name.split(".")) else dtype
            tensor.data = tensor.data.to(want)
    return model


def wan_denoiser(transformer: nn.Module) -> Denoiser:
    return Denoiser(WanBackbone(transformer), FlowMatching(shift=SHIFT), "flow")


def forward_flops(wan: dict, latent: tuple[int, int, int], text_tokens: int) -> dict[str, float]:
    """Model FLOPs of one forward pass of one sample, by part (2 FLOPs per multiply-add).

    ``embed_in``: the embeddings' first layers, which read the data (patch convolution, text and time
    ``linear_1``); ``embed``: their other layers; ``linear``: the blocks' projections of the latent
    tokens (self-attention q, k, v, o; cross-attention q, o; FFN); ``text_kv``: cross-attention k, v
    of the text tokens;
    ``attention``: the blocks' ``QKᵀ`` and ``PV`` (self over N tokens, cross over the text);
    ``head``: the output projection.
    """
    p_t, p_h, p_w = wan["patch_size"]
    t, h, w = latent
    n = (t // p_t) * (h // p_h) * (w // p_w)  # latent tokens
    s = text_tokens
    d = wan["num_attention_heads"] * wan["attention_head_dim"]
    f, layers, patch = wan["ffn_dim"], wan["num_layers"], p_t * p_h * p_w
    embed_in = n * wan["in_channels"] * patch * d + s * wan["text_dim"] * d + wan["freq_dim"] * d
    embed = s * d * d + d * d + d * 6 * d  # text linear_2; time linear_2 and time_proj (to 6 modulations)
    linear = layers * (4 * n * d * d + 2 * n * d * d + 2 * n * d * f)
    text_kv = layers * 2 * s * d * d
    attention = layers * (2 * n * n * d + 2 * n * s * d)
    head = n * d * wan["out_channels"] * patch
    macs = {"embed_in": embed_in, "embed": embed, "linear": linear, "text_kv": text_kv, "attention": attention,
            "head": head}
    return {k: 2.0 * v for k, v in macs.items()}


def step_flops(fwd: dict[str, float], steps: int, lora_fake: bool) -> float:
    """Model FLOPs of one DOLLAR step per sample (module doc), from the forward FLOPs by part."""
    one = sum(fwd.values())
    # backward: input and weight gradients (2×), but the data the embeddings read needs none
    trained = one + 2 * one - fwd["embed_in"]
    # a LoRA role's frozen linears: input gradients only (1×), none for the frozen embeddings and what
    # reads only them (cross-attention k, v of the text)
    lora = one + fwd["linear"] + fwd["head"] + 2 * fwd["attention"]
    student = steps * trained + 2 * one + one  # G_θ(ε) with grad; real score (CFG: 2 passes); fake score
    fake = steps * one + (lora if lora_fake else trained)  # x̂ regenerated without grad; fake loss + backward
    return student + fake


def device_peak(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float | None, str]:
    """``(peak FLOP/s, where it came from)``: the datasheet's dense bf16 peak on a GPU, a measured matmul on a CPU."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16:
            if key in name:
                return peak, f"datasheet dense bf16 peak of {name}"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, (f"measured: best of 5 {n}³ matmuls, {str(dtype).removeprefix('torch.')}, "
                             f"{torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def clock(device: torch.device) -> float:
    """``perf_counter`` once the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def make_batch(batch_size: int, latent: tuple[int, int, int], size: Size, device: torch.device, seed: int) -> Batch:
    """Random caption embeddings (B, L, text_dim) fp32 as the latent cache serves them; zeros as the null
    caption; the latents only give the student's sample shape."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, size.text_tokens, size.wan["text_dim"])
    mask = torch.ones(shape[:2], dtype=torch.bool)
    cond = Conditioning(torch.randn(shape, generator=g), mask).to(device=device)
    uncond = Conditioning(torch.zeros(shape), mask).to(device=device)
    latents = torch.zeros(batch_size, size.wan["in_channels"], *latent, device=device)  # (B, C, T, H, W)
    return Batch(latents, cond, uncond, ["a prompt"] * batch_size, torch.arange(batch_size))


def live_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in modules, optimisers and batches (CPU accounting)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        elif isinstance(obj, Batch):
            for t in (obj.latents, obj.cond.context, obj.cond.mask, obj.uncond.context, obj.uncond.mask):
                add(t)
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# (a) sampling
# ---------------------------------------------------------------------------------------------

def time_sampling(denoiser: Denoiser, batch: Batch, teacher_steps: int, repeats: int, device: torch.device,
                  dtype: torch.dtype, seed: int) -> dict:
    """Seconds per batch of the teacher (CFG) and the student (no CFG), median of ``repeats`` interleaved runs."""
    schedule = denoiser.schedule
    teacher_times = sampling_grid(schedule, teacher_steps)  # (51,) uniform, 1 → 0
    student_times = StudentGenerator(GeneratorConfig(times=STUDENT_TIMES)).sampling_times(schedule)  # K, then 0
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=g).to(device)  # (B, C, T, H, W)
    renoise = [torch.randn(noise.shape, generator=g).to(device) for _ in student_times[2:]] + [torch.zeros_like(noise)]
    runs = {
        "teacher": lambda times: sample_euler(denoiser, noise, times, batch.cond, cfg_scale=CFG_SCALE,
                                              uncond=batch.uncond),
        "student": lambda times: sample_consistency(denoiser, noise, times, batch.cond,
                                                    noises=renoise[-(len(times) - 1):]),
    }
    grids = {"teacher": teacher_times, "student": student_times}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    nfe = {}
    with torch.inference_mode(), autocast(device, dtype):
        for name, run in runs.items():  # warm-up (kernels, allocator, compilation): one step each
            run(grids[name][-2:])
        for _ in range(repeats):
            for name, run in runs.items():
                start = clock(device)
                nfe[name] = run(grids[name]).nfe
                seconds[name].append(clock(device) - start)
    t_sec, s_sec = (statistics.median(seconds[k]) for k in ("teacher", "student"))
    return {"teacher": {"steps": teacher_steps, "cfg_scale": CFG_SCALE, "nfe": nfe["teacher"], "seconds": t_sec,
                        "runs": seconds["teacher"]},
            "student": {"steps": len(student_times) - 1, "times": STUDENT_TIMES, "nfe": nfe["student"],
                        "seconds": s_sec, "runs": seconds["student"]},
            "speedup": t_sec / s_sec, "nfe_ratio": nfe["teacher"] / nfe["student"]}


# ---------------------------------------------------------------------------------------------
# (b, c) the DOLLAR step
# ---------------------------------------------------------------------------------------------

def make_roles(teacher: Denoiser, lora_fake: bool, checkpointing: bool, lora_rank: int, device: torch.device) -> Roles:
    """student (trainable fp32 copy), teacher (frozen), fake_score (trainable fp32 copy, or LoRA on a shared
    copy of the teacher), built by the engine's :func:`build_roles` as a recipe's roles are."""
    optim = OptimConfig(lr=1e-5, grad_clip=1.0)
    lora = LoraConfig(rank=lora_rank, alpha=lora_rank) if lora_fake else None
    specs = {"student": RoleSpec(optim=optim), "teacher": RoleSpec(), "fake_score": RoleSpec(optim=optim, lora=lora)}
    modules = {"student": copy.deepcopy(teacher).float().requires_grad_(True), "teacher": teacher,
               "fake_score": shared_copy(teacher) if lora_fake
               else copy.deepcopy(teacher).float().requires_grad_(True)}
    return build_roles(modules, specs, DistEnv(device=device), checkpointing)


def dollar_step(roles: Roles, batch: Batch, ctx: StepContext, objectives, device, dtype) -> None:
    """Each role's update as ``engine.trainer.Trainer.update_role`` makes it (one micro-batch)."""
    for objective in objectives:
        role = roles[objective.role]
        role.optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = objective(batch, roles, replace(ctx, role=role.name).with_batch(batch.sample_ids, 0))
            total = sum(objective.weight * loss.float().mean() for loss in out.losses.values())
        total.backward()
        clip_grad_norm(role.params, role.spec.optim.grad_clip)
        role.optimizer.step()
        role.optimizer.zero_grad(set_to_none=True)


def bench_setup(teacher: Denoiser, batch: Batch, *, lora_fake: bool, checkpointing: bool, lora_rank: int,
                repeats: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Step time (median of ``repeats`` after one warm-up step) and memory (one more step) of one set-up."""
    roles = make_roles(teacher, lora_fake, checkpointing, lora_rank, device)
    fake = roles["fake_score"]
    shared = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    own = [p for p in fake.module.parameters() if p.untyped_storage().data_ptr() not in shared]
    out = {"fake_score": "lora" if lora_fake else "full", "checkpointing": checkpointing,
           "fake_score_params": {"trainable": sum(p.numel() for p in fake.params),
                                 "own_bytes": sum(p.numel() * p.element_size() for p in own),
                                 "trainable_dtype": str(fake.params[0].dtype).removeprefix("torch.")}}
    objectives = [VSD(VSD.Config(real_cfg_scale=CFG_SCALE, backprop="all"), "vsd"),
                  FakeScoreLoss(FakeScoreLoss.Config(), "fake")]
    ctx = StepContext(step=0, stage=0, stage_step=0, role="student", seed=seed, device=device,
                      sample_ids=batch.sample_ids, generator=torch.Generator(), student=StudentGenerator(
                          GeneratorConfig(times=STUDENT_TIMES)))

    def step(i: int):
        return lambda: dollar_step(roles, batch, replace(ctx, step=i, stage_step=i), objectives, device, dtype)

    step(0)()  # warm-up; allocates the optimiser state
    seconds = []
    for i in range(1, repeats + 1):
        start = clock(device)
        step(i)()
        seconds.append(clock(device) - start)
    out["seconds"], out["runs"] = statistics.median(seconds), seconds
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(repeats + 1)()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = live_bytes(*[r.module for r in roles.values()], *[r.optimizer for r in roles.trainable()], batch)
        peak = before + peak_memory(step(repeats + 1), device)
    out["memory"] = {"peak_bytes": peak, "step_bytes": peak - before, "resident_bytes": before}
    out["fake_score_params"]["optimizer_bytes"] = live_bytes(fake.optimizer)
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[args.dtype]
    size = SIZES[args.size]
    if args.layers:
        size = replace(size, wan={**size.wan, "num_layers": args.layers})
    if args.latent:
        size = replace(size, latent=tuple(args.latent))
    lora_rank = args.lora_rank or size.lora_rank
    compile_mode = args.compile if args.compile != "auto" else ("on" if device.type == "cuda" else "off")

    transformer = cast_like_from_pretrained(build_transformer(size.wan, device, args.seed), dtype)
    teacher = wan_denoiser(transformer)
    batch = make_batch(args.batch, size.latent, size, device, args.seed)
    p = size.wan["patch_size"]
    tokens = (size.latent[0] // p[0]) * (size.latent[1] // p[1]) * (size.latent[2] // p[2])
    fwd = forward_flops(size.wan, size.latent, size.text_tokens)
    import diffusers

    result: dict = {"config": {
        "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "transformer": size.wan,
        "parameters": sum(p.numel() for p in transformer.parameters()), "batch": args.batch,
        "latent_shape": [args.batch, size.wan["in_channels"], *size.latent], "text_tokens": size.text_tokens,
        "tokens_per_sample": tokens, "teacher_steps": args.teacher_steps, "cfg_scale": CFG_SCALE,
        "student_times": STUDENT_TIMES, "lora_rank": lora_rank, "repeats": args.repeats, "seed": args.seed,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "forward_flops_per_sample": fwd}}

    # (a) sampling, eager
    result["sampling"] = {"eager": time_sampling(teacher, batch, args.teacher_steps, args.repeats, device, dtype,
                                                 args.seed),
                          "goal_speedup": 24.0}
    print_sampling("eager", result["sampling"]["eager"])

    # (b, c) the DOLLAR step in four set-ups
    peak, peak_source = device_peak(device, dtype, args.peak_tflops)
    training = {"step": "vsd (student) + fake_score (fake_score) updates, objectives/distribution_matching.py",
                "backprop": "all", "peak_flops": peak, "peak_source": peak_source,
                "flops_per_step": {kind: args.batch * step_flops(fwd, 4, kind == "lora") for kind in ("full", "lora")},
                "setups": []}
    result["training"] = training
    for lora_fake in (False, True):
        for checkpointing in (False, True):
            try:
                setup = bench_setup(teacher, batch, lora_fake=lora_fake, checkpointing=checkpointing,
                                    lora_rank=lora_rank, repeats=args.repeats, device=device, dtype=dtype,
                                    seed=args.seed)
            except torch.OutOfMemoryError as err:
                setup = {"fake_score": "lora" if lora_fake else "full", "checkpointing": checkpointing,
                         "error": f"out of memory: {str(err).splitlines()[0]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "seconds" in setup:
                flops = training["flops_per_step"][setup["fake_score"]]
                setup["tokens_per_second"] = tokens * args.batch / setup["seconds"]
                setup["flops_per_second"] = flops / setup["seconds"]
                setup["mfu"] = None if peak is None else setup["flops_per_second"] / peak
            training["setups"].append(setup)
            print_setup(setup)

    # (a) sampling, compiled (in place on the teacher's blocks, hence last)
    if compile_mode == "off":
        reason = "--compile off" if args.compile == "off" else (
            "off by default on a CPU (inductor builds C++ kernels first: ~40 s on 2 cores); pass --compile")
        result["sampling"]["compiled"] = {"skipped": reason}
    else:
        try:
            transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
            result["sampling"]["compiled"] = time_sampling(teacher, batch, args.teacher_steps, args.repeats, device,
                                                           dtype, args.seed)
        except Exception as err:  # a backend that cannot compile here is a result, not a crash
            first = (str(err).strip().splitlines() or [""])[0]
            result["sampling"]["compiled"] = {"skipped": f"torch.compile failed: {type(err).__name__}: {first}"}
    print_sampling("compiled", result["sampling"]["compiled"])
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def print_sampling(mode: str, r: dict) -> None:
    if "skipped" in r:
        print(f"(a) sampling, {mode}: skipped ({r['skipped']})", flush=True)
        return
    t, s = r["teacher"], r["student"]
    print(f"(a) sampling, {mode}: teacher {t['steps']} steps CFG ({t['nfe']} NFE) {t['seconds']:.3f} s | student "
          f"{s['steps']} steps ({s['nfe']} NFE) {s['seconds']:.3f} s | speed-up {r['speedup']:.1f}× "
          f"(NFE ratio {r['nfe_ratio']:.0f}×)", flush=True)


def print_setup(r: dict) -> None:
    name = f"fake={r['fake_score']:<4} ckpt={'on ' if r['checkpointing'] else 'off'}"
    if "error" in r:
        print(f"(b,c) {name}: {r['error']}", flush=True)
        return
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    m, f = r["memory"], r["fake_score_params"]
    print(f"(b,c) {name}: {r['seconds']:.3f} s/step, {r['tokens_per_second']:.0f} tokens/s, "
          f"{r['flops_per_second'] / 1e12:.3f} TFLOP/s, MFU {mfu}, peak {_gib(m['peak_bytes'])} "
          f"(step {_gib(m['step_bytes'])}), fake score trains {f['trainable'] / 1e6:.2f} M params, "
          f"own weights {_gib(f['own_bytes'])}, optimiser {_gib(f['optimizer_bytes'])}", flush=True)


def table(result: dict) -> str:
    """The figures as a Markdown table."""
    c = result["config"]
    layers = c["transformer"]["num_layers"]
    lines = [f"Wan2.1-T2V-1.3B-shaped transformer, random weights: {layers} layer{'s' * (layers != 1)}, "
             f"{c['parameters'] / 1e6:.1f} M parameters, latents {tuple(c['latent_shape'])} = "
             f"{c['tokens_per_sample']} tokens/sample, text {c['text_tokens']} tokens, {c['dtype']}, "
             f"{c['device_name']} ({c['threads']} threads)", "",
             "| sampling | teacher s (NFE) | student s (NFE) | speed-up | NFE ratio |", "|---|---|---|---|---|"]
    for mode in ("eager", "compiled"):
        r = result["sampling"][mode]
        if "skipped" in r:
            lines.append(f"| {mode} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {mode} | {r['teacher']['seconds']:.3f} ({r['teacher']['nfe']}) | "
                         f"{r['student']['seconds']:.3f} ({r['student']['nfe']}) | {r['speedup']:.1f}× | "
                         f"{r['nfe_ratio']:.0f}× |")
    tr = result["training"]
    lines += ["", f"DOLLAR step (VSD student update + fake-score update), batch {c['batch']}; "
                  f"model TFLOP/step: full {tr['flops_per_step']['full'] / 1e12:.3f}, "
                  f"LoRA {tr['flops_per_step']['lora'] / 1e12:.3f}; MFU peak: {tr['peak_source']} "
                  f"= {(tr['peak_flops'] or 0) / 1e12:.3g} TFLOP/s", "",
              "| fake score | ckpt | s/step | tokens/s | TFLOP/s | MFU | peak mem | step mem | fake trainable params | "
              "fake own weights + optimiser |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tr["setups"]:
        head = f"| {r['fake_score']} | {'on' if r['checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | |")
            continue
        m, f = r["memory"], r["fake_score_params"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{head} {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['flops_per_second'] / 1e12:.3f} "
                     f"| {mfu} | {_gib(m['peak_bytes'])} | {_gib(m['step_bytes'])} | {f['trainable'] / 1e6:.2f} M | "
                     f"{_gib(f['own_bytes'] + f['optimizer_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="reduced")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default: the size's)")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"), default=None,
                        help="latent frames, height, width (default: the size's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--compile", nargs="?", const="on", choices=("auto", "on", "off"), default="auto",
                        help="also time sampling with torch.compile (auto: on CUDA only)")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each measurement (median)")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA fake score's rank (default: the size's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: detected)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print()
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
