"""A toy video feature encoder for Fréchet distances: the toy world's "Inception" (FVD-style).

FID/FVD embed real and generated samples with a network trained to *classify* real data
(Inception v3, I3D) and compare Gaussians fitted to its penultimate features. Here the network
is a small 3D-conv classifier of the toy world's attributes, trained from pixels::

    clip (B, T, H, W, 3) ─3D conv stages─▶ (B, C, T', H', W') ─mean ⊕ max pool─▶ (B, 2C)
        (the first stages are per frame, kernels 1×3×3, so that fast motion does not smear
         shapes; the later ones are 3×3×3 and stride time)
        ─Linear, GELU─▶ features (B, d) ─one linear head per attribute─▶ colour, shape, motion,
                                                                         speed, background

:meth:`VideoFeatureNet.features` returns the penultimate features (``d = feature_dim``).
Clips of another length or size are resampled to the net's own ``frames × size²`` first.
:func:`reference_stats` fits the real-clip statistics the evaluation compares against and
caches them in a ``.npz`` next to the weights (the shipped ``toy-features`` directory).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from fewstep.config import StrictModel
from fewstep.data.toyworld import EVAL_PROMPTS, FRAMES, SIZE, eval_suite
from fewstep.errors import UserError
from fewstep.rewards.base import load_asset, resolve_asset, save_asset
from fewstep.rewards.toy_clip import resample
from fewstep.rewards.training_data import ATTRIBUTES, LabelledClips, Progress, fit
from fewstep.utils.io import apply_umask

from .frechet import FrechetStats

SHIPPED_NAME = "toy-features"
REFERENCE_CLIPS = 1024  # real eval clips behind the cached reference statistics


class FeatureNetConfig(StrictModel):
    """Architecture of the feature net (the clip geometry it was trained on included)."""

    frames: int = Field(FRAMES, ge=2, description="clip length T the net expects")
    size: int = Field(SIZE, ge=8, description="frame height = width the net expects, px")
    channels: list[int] = Field([16, 32, 64], min_length=1, description="one 3D conv stage each")
    spatial_strides: list[int] = Field([2, 2, 2], description="spatial stride per stage")
    temporal_kernels: list[int] = Field([1, 3, 3], description="temporal kernel size per stage (1 = per frame)")
    temporal_strides: list[int] = Field([1, 2, 2], description="temporal stride per stage")
    feature_dim: int = Field(64, ge=2, description="width d of the penultimate features")

    @pydantic.model_validator(mode="after")
    def _check(self) -> FeatureNetConfig:
        n = len(self.channels)
        if not len(self.spatial_strides) == len(self.temporal_kernels) == len(self.temporal_strides) == n:
            raise ValueError(f"spatial_strides, temporal_kernels and temporal_strides need one entry per stage ({n})")
        return self


class VideoFeatureNet(nn.Module):
    """3D-conv attribute classifier whose penultimate layer embeds clips (module docstring)."""

    def __init__(self, config: FeatureNetConfig | None = None):
        super().__init__()
        self.config = config = config or FeatureNetConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c, ss, kt, st in zip(config.channels, config.spatial_strides, config.temporal_kernels,
                                 config.temporal_strides):
            layers += [nn.Conv3d(c_in, c, (kt, 3, 3), stride=(st, ss, ss), padding=(kt // 2, 1, 1), bias=False),
                       nn.BatchNorm3d(c), nn.ReLU()]
            c_in = c
        self.encoder = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(2 * c_in, config.feature_dim), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(classes))
                                    for name, classes in ATTRIBUTES.items()})
        self.directory: Path | None = None  # set by load(); where reference statistics are cached
        self.metrics: dict = {}  # training metrics, filled by load()

    def forward(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, T, H, W, 3)`` float in [−1, 1] → ``(features (B, d), {attribute: logits (B, n)})``."""
        x = resample(frames, self.config.frames, self.config.size)  # frames picked evenly in time
        x = rearrange(x, "b t h w c -> b c t h w")
        g = self.encoder(x)  # (B, C, T', H', W')
        pooled = torch.cat([g.mean(dim=(2, 3, 4)), g.amax(dim=(2, 3, 4))], dim=1)  # (B, 2C)
        feats = self.embed(pooled)  # (B, d)
        return feats, {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def features(self, frames, batch_size: int = 64) -> np.ndarray:
        """Penultimate features ``(N, d)`` float32 of clips ``(N, T, H, W, 3)`` (uint8, or float in [−1, 1])."""
        frames = _as_unit_tensor(frames)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [self(frames[i: i + batch_size].to(device))[0].cpu() for i in range(0, len(frames), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy().astype(np.float32)

    def loss(self, frames: Tensor, labels: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Sum over attributes of the cross-entropy; metrics hold each attribute's batch accuracy."""
        _, logits = self(frames)
        losses = {name: F.cross_entropy(logits[name], labels[name].to(frames.device)) for name in logits}
        loss = sum(losses.values())
        metrics = {"loss": float(loss.detach())}
        metrics |= {f"acc_{n}": float((logits[n].argmax(1).cpu() == labels[n]).float().mean()) for n in logits}
        return loss, metrics

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path, metrics: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (dropping cached statistics)."""
        return save_asset(directory, self.config, self, metrics)

    @classmethod
    def load(cls, name_or_dir: str | Path = SHIPPED_NAME, device: str | torch.device = "cpu") -> VideoFeatureNet:
        """The shipped ``toy-features`` (``src/fewstep/assets/toy-features/``) or a saved directory."""
        directory = resolve_asset(name_or_dir, SHIPPED_NAME, "feature net")
        net, metrics = load_asset(directory, FeatureNetConfig, cls, "feature net", device)
        net.directory, net.metrics = directory, metrics
        return net


def _as_unit_tensor(frames) -> Tensor:
    """uint8 or float ``(N, T, H, W, 3)`` (numpy or torch) → float32 tensor in [−1, 1]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, Tensor) or frames.ndim != 5 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise UserError(f"clips have shape {shape}; expected (N, T, H, W, 3)")
    if frames.dtype == torch.uint8:
        return frames.float() / 127.5 - 1.0
    if not frames.is_floating_point():
        raise UserError(f"clips have dtype {frames.dtype}; expected uint8 or float in [-1, 1]")
    return frames.detach().float().clamp(-1, 1)


# --- training ------------------------------------------------------------------------------------


@torch.no_grad()
def attribute_accuracy(net: VideoFeatureNet, clips: LabelledClips, batch_size: int = 64) -> dict[str, float]:
    """Top-1 accuracy per attribute on ``clips`` (unaugmented) and their mean (``mean``)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    hits: dict[str, list[Tensor]] = {name: [] for name in ATTRIBUTES}
    for lo in range(0, len(clips), batch_size):
        frames = _as_unit_tensor(clips.videos[lo: lo + batch_size]).to(device)
        _, logits = net(frames)
        for name in ATTRIBUTES:
            hits[name].append(logits[name].argmax(1).cpu() == torch.from_numpy(clips.labels[name][lo: lo + batch_size]))
    net.train(was_training)
    acc = {name: float(torch.cat(h).float().mean()) for name, h in hits.items()}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def train_feature_net(
    steps: int = 400,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    *,
    config: FeatureNetConfig | None = None,
    model: VideoFeatureNet | None = None,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    pool_size: int = 3000,
    data: LabelledClips | None = None,
    eval_clips: int = 512,
    log_every: int = 50,
) -> tuple[VideoFeatureNet, dict]:
    """Train the feature net on ``ToyWorld("train")`` clips; returns ``(model, metrics)``.

    Phases: render a pool of ``pool_size`` training clips at the toy world's geometry (or use
    ``data``, e.g. the pool the toy CLIP trained on) → ``steps`` AdamW steps (linear warm-up,
    cosine decay) on batches under the flip/reversal symmetries → attribute accuracy on
    ``eval_clips`` clips of ``ToyWorld("eval")`` at the training clips' geometry (keys
    ``eval_acc_*``). ``model`` continues training an existing net (with a fresh optimizer).
    ``progress(step, steps, metrics)`` is called every ``log_every`` steps and at the end.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = (model or VideoFeatureNet(config)).to(device).train()
    data = data or LabelledClips.render("train", pool_size)  # the toy world's geometry; the net resamples
    render_s = time.perf_counter() - start

    def loss_fn():
        batch = data.sample(batch_size, rng, pairs=False)
        return model.loss(batch["frames"].to(device), batch["labels"])

    metrics = fit(model, steps, lr, warmup_steps, loss_fn, progress, log_every)

    model.eval()
    frames, size = data.videos.shape[1:3]  # evaluate at the geometry trained on
    results = {f"eval_acc_{k}": v for k, v in attribute_accuracy(
        model, LabelledClips.render("eval", eval_clips, frames, size)).items()}
    results |= {"final_loss": metrics.get("loss", float("nan")), "steps": steps, "batch_size": batch_size,
                "seed": seed, "render_seconds": render_s, "seconds": time.perf_counter() - start}
    return model, results


# --- reference statistics -----------------------------------------------------------------------


def reference_suite(num_clips: int) -> list[tuple[str, int]]:
    """``num_clips`` (prompt, seed) pairs of ``eval_suite``, round-robin over ``EVAL_PROMPTS``."""
    if not isinstance(num_clips, int) or num_clips < 2:
        raise UserError(f"num_clips={num_clips!r} is invalid; expected an integer >= 2")
    per_prompt = -(-num_clips // len(EVAL_PROMPTS))
    suite = eval_suite(per_prompt)  # prompt-major
    order = [p * per_prompt + j for j in range(per_prompt) for p in range(len(EVAL_PROMPTS))]
    return [suite[i] for i in order[:num_clips]]


def reference_stats(
    num_clips: int = REFERENCE_CLIPS,
    net: VideoFeatureNet | None = None,
    frames: int | None = None,
    size: int | None = None,
    cache_dir: str | Path | None = None,
) -> FrechetStats:
    """Fréchet statistics of ``num_clips`` real eval clips (:func:`reference_suite`) rendered at
    ``frames × size²`` (default: the net's own), embedded by ``net`` (default: the shipped one).

    Cached as ``cache_dir/reference_{num_clips}_{frames}x{size}.npz`` (default ``cache_dir``: the
    directory the net was loaded from, which :meth:`VideoFeatureNet.save` replaces whole, so a
    cache never outlives its weights; an unsaved net has no cache). The cache is written
    atomically and skipped silently where the directory is read-only.
    """
    net = net or VideoFeatureNet.load()
    frames = frames or net.config.frames
    size = size or net.config.size
    cache_dir = Path(cache_dir) if cache_dir is not None else net.directory
    path = cache_dir / f"reference_{num_clips}_{frames}x{size}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        return FrechetStats.load(path)

    clips = LabelledClips.from_suite(reference_suite(num_clips), frames, size)
    stats = FrechetStats.from_features(net.features(clips.videos))
    if path is not None:
        _save_cache(stats, path)
    return stats


def _save_cache(stats: FrechetStats, path: Path) -> None:
    """Write ``stats`` to ``path`` atomically; skipped where the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    except OSError:
        return
    os.close(fd)
    try:
        stats.save(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
