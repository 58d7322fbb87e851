"""``fewstep pretrain``: build the embedded default's models from scratch (DESIGN §4).

Stages, each resumable and each writing its result under the work directory::

    rewards   the toy CLIP reward and the toy video feature net (Fréchet distance), shipped as
              ``toy-clip`` and ``toy-features`` (minutes each; see fewstep.rewards / fewstep.eval)
    codec     video autoencoder on toy clips (L1 + MSE), then the latent scaling factor
              s = 1/std(z) so that teacher latents have unit variance (as LDM does)
    latents   a cache of N training clips encoded by the frozen codec (+ their captions)
    teacher   toy DiT + caption encoder, trained jointly with the flow-matching loss
              ‖u_θ(x_t, t, c) − (ε − x0)‖², t ~ logit-normal (Esser et al. 2024), 10% of
              captions dropped to "" for classifier-free guidance, EMA of the weights
    export    the EMA teacher + codec + caption encoder as a VideoPipeline directory
    i2v       (not part of "all") the image-to-video teacher ``toy-teacher-i2v``, fine-tuned from a T2V
              teacher (``i2v.source``): its DiT gains the [image_mask, image_latent] input channels with
              zero weights (models/pipeline.image_to_video, so step 0 is the T2V teacher), then the same
              flow-matching loss on toy clips conditioned on their own first frame (encode_images), captions
              dropped as above and the image kept (CFG's unconditional branch of an I2V model keeps it);
              the text encoder and codec stay the source's; exported when its steps are done

Long stages run in chunks: ``--max-minutes`` bounds one invocation; the state (weights,
optimizer moments, EMA, step, RNG, data order) is checkpointed atomically every
``checkpoint_every`` steps and at the end of a chunk, and the next invocation continues.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from .config import StrictModel
from .data.toyworld import VOCAB, ToyWorld
from .diffusion.schedules import FlowMatchingConfig, LogitNormal
from .errors import UserError
from .models.codec import ToyCodec, ToyCodecConfig, frames_to_video
from .models.pipeline import SamplingConfig, ToyPipelineConfig, VideoPipeline, image_to_video
from .models.text_encoder import ToyTextEncoderConfig
from .models.toy_dit import ToyDiTConfig
from .objectives.flow_matching import denoising_loss
from .utils.io import atomic_directory


class CodecStage(StrictModel):
    steps: int = Field(7000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    # a strong weight breaks the "background plus blob" plateau early; a light one later lets the
    # background around the subject's edges catch up (a strong one leaves a faint halo there)
    foreground_weight: float = Field(10.0, ge=0, description="extra loss weight on subject pixels")
    foreground_weight_late: float = Field(3.0, ge=0, description="the extra weight from late_from_step on")
    late_from_step: int = Field(4000, ge=0)
    # per-frame (2D) convolutions: several times cheaper on a CPU than 3D ones, and the toy
    # world's frames need no temporal context to be reconstructed
    model: ToyCodecConfig = Field(default_factory=lambda: ToyCodecConfig(temporal_factor=1, temporal_kernel=1))


class LatentStage(StrictModel):
    num_clips: int = Field(24000, ge=64, description="training clips encoded once by the frozen codec")


class TeacherStage(StrictModel):
    steps: int = Field(20000, ge=1)  # semantic 0.87 at 12000 steps (shapes 0.49), 0.95 at 20000 (0.80)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(500, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = Field(1.0, gt=0)
    # latents of the per-frame codec are (4, 16, 8, 8): patch (2, 2, 2) gives 8·4·4 = 128 tokens
    backbone: ToyDiTConfig = Field(default_factory=lambda: ToyDiTConfig(
        depth=4, patch_size=(2, 2, 2), latent_frames=16, latent_height=8, latent_width=8))
    text_dim: int = 64
    # 50 Euler steps at step 20000, 2 videos × 24 eval prompts: CFG 1.5 / 2 / 3 / 4 gave total 0.883 /
    # 0.889 / 0.881 / 0.867 and Fréchet distance 33 / 38 / 52 / 65 (semantic 0.927 / 0.950 / 0.953 /
    # 0.949): above 2, guidance over-saturates and the distance to real clips grows
    cfg_scale: float = Field(2.0, description="default CFG scale written into the exported model")


class RewardStage(StrictModel):
    clip_steps: int = Field(500, ge=1, description="toy CLIP (contrastive frame/clip-caption scorer) steps")
    feature_steps: int = Field(400, ge=1, description="toy video feature net (for Fréchet distance) steps")
    batch_size: int = Field(64, ge=2)
    pool_size: int = Field(3000, ge=64, description="labelled training clips rendered once for both")


class I2VStage(StrictModel):
    source: str = Field("toy-teacher", description="the text-to-video toy teacher to start from (name or directory)")
    # sized for ~30 minutes on 2 free CPU cores (encoding the clips ~1 of them)
    num_clips: int = Field(3000, ge=64, description="training clips (and their first frames) encoded once")
    # the subject's place in the generated first frame follows the image slowly: the IoU of its mask with the
    # condition's (25 Euler steps, 16 eval clips) rose 0.29 → 0.37 → 0.43 → 0.54 at 250, 500, 1000, 1500 steps
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    # at lr 1e-4 everywhere the zero-initialised condition columns stayed ~100× smaller than the latent ones
    # after 450 steps (the teacher ignored its image): the patch embedding gets its own, larger rate
    condition_lr: float = Field(3e-3, gt=0, description="lr of the patch embedding (its image_mask/image_latent "
                                                        "columns start at zero)")
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = Field(1.0, gt=0)


class PretrainConfig(StrictModel):
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    codec: CodecStage = Field(default_factory=CodecStage)
    latents: LatentStage = Field(default_factory=LatentStage)
    teacher: TeacherStage = Field(default_factory=TeacherStage)
    rewards: RewardStage = Field(default_factory=RewardStage)
    i2v: I2VStage = Field(default_factory=I2VStage)


Progress = Callable[[str, int, int, dict], None]  # (stage, step, total, metrics)


# ----------------------------------------------------------------------------------------------
# small persistence helpers (safetensors + JSON, never pickle; atomic directory writes)
# ----------------------------------------------------------------------------------------------

def _atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    with atomic_directory(target) as tmp:
        write(tmp)


def _optimizer_step(opt, loss: torch.Tensor, params: list, ema: list, grad_clip: float, ema_decay: float) -> float:
    """Back-propagate ``loss``, clip, step, then move the EMA copies ``ema`` of ``params``; the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay)
    return loss.item()


def _checkpoint(cfg: "PretrainConfig", step: int, steps: int, out_of_time: bool, state_dir: Path,
                save_state: Callable[[Path], None]) -> bool:
    """Save the state every ``checkpoint_every`` steps, at the end and when out of time; True when out of time
    before the end (the stage stops there, to be resumed)."""
    if step % cfg.checkpoint_every == 0 or out_of_time or step == steps:
        _atomic_dir(state_dir, save_state)
    return out_of_time and step < steps


def _save_state(directory: Path, params: list, ema: list, opt, generator: torch.Generator, step: int) -> None:
    """A training stage's resumable state: parameters, their EMA copies, the optimiser, the data generator, step."""
    tensors, meta = optimizer_tensors(opt)
    model = {f"p{i}": p.detach().contiguous() for i, p in enumerate(params)}
    model.update({f"ema{i}": e.contiguous() for i, e in enumerate(ema)})
    save_file(model, directory / "model.safetensors")
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "state.json").write_text(json.dumps({
        "step": step, "optimizer": meta, "generator": generator.get_state().tolist()}))


def _restore_state(state_dir: Path, params: list, ema: list, opt, generator: torch.Generator) -> int:
    """Load what :func:`_save_state` wrote into the live objects (nothing there: a fresh start); the step."""
    if not (state_dir / "state.json").is_file():
        return 0
    meta = json.loads((state_dir / "state.json").read_text())
    model = load_file(state_dir / "model.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(model[f"p{i}"])
            ema[i].copy_(model[f"ema{i}"])
    load_optimizer_tensors(opt, load_file(state_dir / "optimizer.safetensors"), meta["optimizer"])
    generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    return meta["step"]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (flat tensors, JSON-able rest) for safetensors."""
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                state_meta[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": state_meta}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------

def _clip_batch(world: ToyWorld, indices: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    """Toy clips as a codec input ``(B, 3, T, H, W)`` in [−1, 1] and their captions."""
    batch = world.batch(indices.tolist())
    frames = torch.as_tensor(batch["frames"])  # (B, T, H, W, 3)
    return frames_to_video(frames), list(batch["prompts"])


def subject_mask(video: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """``(B, 1, T, H, W)`` 1 where a pixel differs from its clip's border colour (the toy subject)."""
    border = torch.cat([video[..., :2, :].flatten(2), video[..., -2:, :].flatten(2)], dim=2)  # (B, 3, n)
    background = border.median(dim=2).values[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    return ((video - background).abs().amax(dim=1, keepdim=True) > threshold).to(video.dtype)


def train_codec(cfg: PretrainConfig, work: Path, max_seconds: float, progress: Progress | None) -> bool:
    """Train the autoencoder; returns True when the stage is complete (``work/codec/`` written)."""
    stage = cfg.codec
    final, state_dir = work / "codec", work / "codec_state"
    if (final / "done.json").is_file():
        return True
    torch.manual_seed(cfg.seed)
    codec = ToyCodec(stage.model)
    opt = torch.optim.AdamW(codec.parameters(), lr=stage.lr)
    step = 0
    if (state_dir / "state.json").is_file():
        meta = json.loads((state_dir / "state.json").read_text())
        codec.load_state_dict(load_file(state_dir / "model.safetensors"))
        load_optimizer_tensors(opt, load_file(state_dir / "optimizer.safetensors"), meta["optimizer"])
        step = meta["step"]
    world = ToyWorld("train", length=10**9)
    start = time.monotonic()

    def save_state(directory: Path):
        tensors, meta = optimizer_tensors(opt)
        save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, directory / "model.safetensors")
        save_file(tensors, directory / "optimizer.safetensors")
        (directory / "state.json").write_text(json.dumps({"step": step, "optimizer": meta}))

    while step < stage.steps:
        # cosine decay keeps the end of training quiet enough for a clean reconstruction
        for group in opt.param_groups:
            group["lr"] = stage.lr * 0.5 * (1 + math.cos(math.pi * step / stage.steps))
        idx = np.arange(step * stage.batch_size, (step + 1) * stage.batch_size) + 10**8  # disjoint from the cache
        video, _ = _clip_batch(world, idx)
        extra = stage.foreground_weight if step < stage.late_from_step else stage.foreground_weight_late
        loss, metrics = codec.reconstruction_loss(video, 1 + extra * subject_mask(video))
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        step += 1
        if progress:
            progress("codec", step, stage.steps, {"loss": loss.detach().mean().item(), "psnr": float(metrics["psnr"])})
        if step % cfg.checkpoint_every == 0 or time.monotonic() - start > max_seconds:
            _atomic_dir(state_dir, save_state)
            if time.monotonic() - start > max_seconds and step < stage.steps:
                return False

    # latent normalisation: unit variance over a fresh set of clips
    codec.eval()
    with torch.no_grad():
        video, _ = _clip_batch(world, np.arange(256) + 2 * 10**8)
        z = codec.encode_raw(video)
        recon = codec.decode(codec.encode(video))
        psnr = float((10 * torch.log10(4.0 / (recon - video).pow(2).flatten(1).mean(1))).mean())
    codec.config.shift_factor = float(z.mean())
    codec.config.scaling_factor = float(1.0 / z.std())

    def write(directory: Path):
        save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, directory / "codec.safetensors")
        (directory / "config.json").write_text(json.dumps(codec.config.model_dump(mode="json"), indent=2))
        (directory / "done.json").write_text(json.dumps({"steps": stage.steps, "psnr_db": psnr}))

    _atomic_dir(final, write)
    if progress:
        progress("codec", step, stage.steps, {"psnr": psnr, "done": 1})
    return True


def load_codec(work: Path) -> ToyCodec:
    directory = work / "codec"
    if not (directory / "done.json").is_file():
        raise UserError(f"no trained codec in {directory}; run `fewstep pretrain --stage codec` first")
    codec = ToyCodec(ToyCodecConfig(**json.loads((directory / "config.json").read_text())))
    codec.load_state_dict(load_file(directory / "codec.safetensors"))
    return codec.eval()


# ----------------------------------------------------------------------------------------------
# latent cache
# ----------------------------------------------------------------------------------------------

def build_latents(cfg: PretrainConfig, work: Path, progress: Progress | None) -> None:
    """Encode ``num_clips`` training clips once: ``work/latents.safetensors`` + captions JSON."""
    path = work / "latents.safetensors"
    if path.is_file():
        return
    codec = load_codec(work)
    world = ToyWorld("train", length=10**9)
    n, chunk = cfg.latents.num_clips, 256
    latents, prompts = [], []
    with torch.no_grad():
        for lo in range(0, n, chunk):
            video, caps = _clip_batch(world, np.arange(lo, min(n, lo + chunk)))
            latents.append(codec.encode(video).to(torch.float16))  # (b, C, T', H', W')
            prompts += caps
            if progress:
                progress("latents", min(n, lo + chunk), n, {})
    tmp = path.with_suffix(".tmp")
    save_file({"latents": torch.cat(latents).contiguous()}, tmp, metadata={"prompts": json.dumps(prompts)})
    os.replace(tmp, path)


def load_latents(work: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    path = work / "latents.safetensors"
    with safe_open(path, framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        latents = f.get_tensor("latents")
    return latents, prompts


# ----------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------

def teacher_pipeline_config(cfg: PretrainConfig, codec: ToyCodec) -> ToyPipelineConfig:
    stage = cfg.teacher
    backbone = stage.backbone.model_copy(update={"text_dim": stage.text_dim})
    return ToyPipelineConfig(
        backbone=backbone, schedule=FlowMatchingConfig(shift=1.0), prediction_type="flow", codec=codec.config,
        text_encoder=ToyTextEncoderConfig(vocab=VOCAB, dim=stage.text_dim),
        sampling=SamplingConfig(sampler="euler", steps=50, cfg_scale=stage.cfg_scale),
    )


def flow_matching_loss(pipe: VideoPipeline, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
                       t_dist) -> torch.Tensor:
    """Per-sample diffusion loss in the denoiser's own parameterisation: ‖out − target(x0, ε)‖²."""
    t = t_dist.sample(x0.shape[0], generator).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return denoising_loss(pipe.denoiser, x0, t, eps, pipe.encode_prompts(prompts))  # (B,)


def train_teacher(cfg: PretrainConfig, work: Path, max_seconds: float, progress: Progress | None) -> bool:
    """Train DiT + caption encoder; returns True when ``teacher.steps`` are done."""
    stage = cfg.teacher
    state_dir = work / "teacher_state"
    codec = load_codec(work)
    latents, prompts = load_latents(work)
    n = latents.shape[0]
    torch.manual_seed(cfg.seed)
    pipe = VideoPipeline(teacher_pipeline_config(cfg, codec))
    pipe.codec.load_state_dict(codec.state_dict())
    params = [*pipe.denoiser.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(cfg.seed)
    step = _restore_state(state_dir, params, ema, opt, generator)
    if step >= stage.steps:
        return True
    t_dist = LogitNormal(stage.logit_normal_mean, stage.logit_normal_std)
    pipe.train()
    pipe.codec.eval()
    start = time.monotonic()

    def save_state(directory: Path):
        _save_state(directory, params, ema, opt, generator, step)

    running = None
    while step < stage.steps:
        lr = stage.lr * min(1.0, (step + 1) / max(1, stage.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        # 1. a batch of cached latents, captions dropped to "" with probability caption_dropout
        idx = torch.randint(n, (stage.batch_size,), generator=generator)
        x0 = latents[idx].float()  # (B, C, T', H', W')
        drop = torch.rand(stage.batch_size, generator=generator) < stage.caption_dropout
        caps = ["" if d else prompts[i] for d, i in zip(drop.tolist(), idx.tolist())]
        # 2. flow-matching loss, step, EMA
        loss = flow_matching_loss(pipe, x0, caps, generator, t_dist).mean()
        value = _optimizer_step(opt, loss, params, ema, stage.grad_clip, stage.ema_decay)
        step += 1
        running = value if running is None else 0.98 * running + 0.02 * value
        if progress:
            progress("teacher", step, stage.steps, {"loss": running, "lr": lr})
        if _checkpoint(cfg, step, stage.steps, time.monotonic() - start > max_seconds, state_dir, save_state):
            return False
    return True


def export_teacher(cfg: PretrainConfig, work: Path, out: Path) -> Path:
    """Write the EMA teacher as a VideoPipeline directory (the shipped ``toy-teacher``)."""
    state_dir = work / "teacher_state"
    if not (state_dir / "state.json").is_file():
        raise UserError(f"no teacher checkpoint in {state_dir}; run `fewstep pretrain --stage teacher` first")
    codec = load_codec(work)
    pipe = VideoPipeline(teacher_pipeline_config(cfg, codec))
    pipe.codec.load_state_dict(codec.state_dict())
    params = [*pipe.denoiser.parameters(), *pipe.text_encoder.parameters()]
    model = load_file(state_dir / "model.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(model[f"ema{i}"])
    return pipe.save(out)


def train_rewards(cfg: PretrainConfig, assets: Path, progress: Progress | None) -> dict:
    """Train and save ``toy-clip`` and ``toy-features`` (with the Fréchet reference statistics)."""
    from .eval.features import reference_stats, train_feature_net
    from .rewards.toy_clip import train_toy_clip
    from .rewards.training_data import LabelledClips

    stage = cfg.rewards
    pool = LabelledClips.render("train", stage.pool_size)

    def report(name):
        return (lambda step, total, metrics: progress(name, step, total, metrics)) if progress else None

    clip, clip_metrics = train_toy_clip(stage.clip_steps, stage.batch_size, cfg.seed, progress=report("toy-clip"),
                                        data=pool, pool_size=stage.pool_size)
    clip.save(assets / "toy-clip", clip_metrics)
    net, feature_metrics = train_feature_net(stage.feature_steps, stage.batch_size, cfg.seed,
                                             progress=report("toy-features"), data=pool, pool_size=stage.pool_size)
    directory = net.save(assets / "toy-features", feature_metrics)
    reference_stats(net=net, cache_dir=directory)
    return {"toy-clip": clip_metrics, "toy-features": feature_metrics}


# ----------------------------------------------------------------------------------------------
# image-to-video teacher (fine-tuned from a text-to-video one)
# ----------------------------------------------------------------------------------------------

def i2v_source(cfg: PretrainConfig) -> VideoPipeline:
    """The text-to-video toy teacher ``i2v.source`` (a one-line error for anything else)."""
    from .models.family import load_model

    source = load_model(cfg.i2v.source)
    if not isinstance(source, VideoPipeline) or source.image_conditioned:
        raise UserError(f"i2v.source {cfg.i2v.source}: expected a text-to-video toy teacher")
    return source


def build_i2v_latents(cfg: PretrainConfig, work: Path, source: VideoPipeline, progress: Progress | None) -> None:
    """Encode ``i2v.num_clips`` training clips and their first frames once (``work/i2v_latents.safetensors``):
    ``latents``, ``image_latent`` and ``image_mask`` (float16) + captions, with the source's codec."""
    path = work / "i2v_latents.safetensors"
    if path.is_file():
        return
    i2v = image_to_video(source).eval()
    frames, size, _ = source.geometry
    world = ToyWorld("train", frames=frames, size=size, length=10**9)
    n, chunk = cfg.i2v.num_clips, 128
    tensors: dict[str, list[torch.Tensor]] = {"latents": [], "image_latent": [], "image_mask": []}
    prompts: list[str] = []
    with torch.no_grad():
        for lo in range(0, n, chunk):
            batch = world.batch(range(lo, min(n, lo + chunk)))
            frames = batch["frames"]  # (b, T, H, W, 3) in [−1, 1]
            tensors["latents"].append(i2v.encode(frames).to(torch.float16))  # (b, C, T', H', W')
            for key, value in i2v.encode_images(frames[:, 0]).items():  # the clip's own first frame
                tensors[key].append(value.to(torch.float16))
            prompts += batch["prompts"]
            if progress:
                progress("i2v-latents", min(n, lo + chunk), n, {})
    tmp = path.with_suffix(".tmp")
    save_file({k: torch.cat(v).contiguous() for k, v in tensors.items()}, tmp, metadata={"prompts": json.dumps(prompts)})
    os.replace(tmp, path)


def train_i2v(cfg: PretrainConfig, work: Path, max_seconds: float, progress: Progress | None) -> bool:
    """Fine-tune the image-to-video DiT from ``i2v.source`` (module doc); True when ``i2v.steps`` are done."""
    from safetensors import safe_open

    stage, state_dir = cfg.i2v, work / "i2v_state"
    source = i2v_source(cfg)
    build_i2v_latents(cfg, work, source, progress)
    with safe_open(work / "i2v_latents.safetensors", framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        data = {key: f.get_tensor(key) for key in ("latents", "image_latent", "image_mask")}
    n = data["latents"].shape[0]
    torch.manual_seed(cfg.seed)
    pipe = image_to_video(source)
    pipe.text_encoder.requires_grad_(False).eval()
    pipe.codec.requires_grad_(False).eval()
    params = list(pipe.denoiser.parameters())
    embed = pipe.denoiser.backbone.module.patch_embed.weight  # (D, (C + 1 + C)·pt·ph·pw), channel-major columns
    groups = [{"params": [p for p in params if p is not embed], "base_lr": stage.lr},
              {"params": [embed], "base_lr": stage.condition_lr}]
    opt = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(cfg.seed)
    step = _restore_state(state_dir, params, ema, opt, generator)
    if step >= stage.steps:
        return True
    t_dist = LogitNormal(stage.logit_normal_mean, stage.logit_normal_std)
    pipe.denoiser.train()
    start = time.monotonic()

    def save_state(directory: Path):
        _save_state(directory, params, ema, opt, generator, step)

    running = None
    while step < stage.steps:
        warmup = min(1.0, (step + 1) / max(1, stage.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * warmup
        lr = stage.lr * warmup
        # 1. cached clips with their own first frame as the condition; captions dropped to "" (the image kept)
        idx = torch.randint(n, (stage.batch_size,), generator=generator)
        x0 = data["latents"][idx].float()  # (B, C, T', H', W')
        drop = torch.rand(stage.batch_size, generator=generator) < stage.caption_dropout
        caps = ["" if d else prompts[i] for d, i in zip(drop.tolist(), idx.tolist())]
        with torch.no_grad():
            cond = pipe.encode_prompts(caps).with_extra(
                {key: data[key][idx].float() for key in ("image_latent", "image_mask")})
        # 2. flow-matching loss, step, EMA
        t = t_dist.sample(stage.batch_size, generator).to(x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        loss = denoising_loss(pipe.denoiser, x0, t, eps, cond).mean()
        value = _optimizer_step(opt, loss, params, ema, stage.grad_clip, stage.ema_decay)
        step += 1
        running = value if running is None else 0.98 * running + 0.02 * value
        if progress:
            progress("i2v", step, stage.steps, {"loss": running, "lr": lr})
        if _checkpoint(cfg, step, stage.steps, time.monotonic() - start > max_seconds, state_dir, save_state):
            return False
    return True


def i2v_card(cfg: PretrainConfig) -> str:
    """The README.md of an exported image-to-video teacher: what it is and how it was made (from ``cfg``)."""
    st = cfg.i2v
    return f"""# toy-teacher-i2v

The image-to-video form of `{st.source}` (model.json `"conditioning": "image"`): the same codec, caption
encoder, flow-matching schedule and default sampler (the image is kept in CFG's unconditional branch); its DiT
takes `[x_t, image_mask, image_latent]` on channels (`backbone.condition_channels` = 1 + the latent channels):
a first-frame mask and the first latent frame of the still clip `[image, …, image]`, zero after it (the toy
codec is not causal; models/pipeline.py says why), as Wan's image-to-video pipeline does.

Made from `{st.source}` by `fewstep pretrain --stage i2v` (src/fewstep/pretrain.py, `I2VStage`, seed
{cfg.seed}): the new patch-embedding columns start at zero (step 0 is exactly the T2V teacher), then {st.steps}
steps of the flow-matching loss on {st.num_clips} toy training clips conditioned on their own first frame,
batch {st.batch_size}, t logit-normal ({st.logit_normal_mean}, {st.logit_normal_std}), captions dropped
{st.caption_dropout:.0%} of the time (the image kept), lr {st.lr:g} ({st.condition_lr:g} for the patch embedding),
EMA {st.ema_decay}, exported as the EMA weights.
The codec and caption encoder are not trained.

Rebuild (resumable — rerun the same command after a stop):

    nice -n 5 fewstep pretrain --stage i2v --work runs/pretrain-i2v --max-minutes 30            # → runs/pretrain-i2v/toy-teacher-i2v
    nice -n 5 fewstep pretrain --stage i2v --work runs/pretrain-i2v --into-package              # maintainers: replace this directory

From scratch: `fewstep pretrain` (the T2V teacher into runs/pretrain/toy-teacher), then the command above
with `--set i2v.source=runs/pretrain/toy-teacher`.

Use it:

    fewstep generate --model toy-teacher-i2v --prompt "a red circle moves left" --image "toy:a red circle moves left" --out runs/gen_i2v
    fewstep generate --model toy-teacher-i2v --prompt "a red circle moves left" --image first_frame.png --out runs/gen_i2v   # RGB at the model's size
    fewstep eval --model toy-teacher-i2v --steps 50 --out runs/eval/teacher_i2v_50
"""


def export_i2v(cfg: PretrainConfig, work: Path, out: Path) -> Path:
    """Write the EMA image-to-video teacher as a VideoPipeline directory (the shipped ``toy-teacher-i2v``) with
    its model card (:func:`i2v_card`)."""
    state_dir = work / "i2v_state"
    if not (state_dir / "state.json").is_file():
        raise UserError(f"no image-to-video checkpoint in {state_dir}; run `fewstep pretrain --stage i2v` first")
    pipe = image_to_video(i2v_source(cfg))
    model = load_file(state_dir / "model.safetensors")
    with torch.no_grad():
        for i, p in enumerate(pipe.denoiser.parameters()):
            p.copy_(model[f"ema{i}"])
    return pipe.eval().save(out, card=i2v_card(cfg))
