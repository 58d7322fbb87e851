"""Metrics of generated videos that need no knowledge of what they show, for any teacher's student.

The toy VBench (:mod:`.analysers`) knows the toy world's shapes and motions; these metrics read
pixels only, so they apply to Wan, CogVideoX or HunyuanVideo samples. Videos are ``(n, T, H, W, 3)``
uint8::

    sharpness   mean over frames of Var(∇²Y), Y the luminance in [0, 1]      (↑ sharper)
    flicker     mean |x_{t+1} − x_t| over consecutive frames, in [0, 1]      (↓ steadier)
    vendi       DOLLAR Eq. 17 on raw pixel keyframes, per prompt             (↑ more diverse)
    Fréchet     d² between Gaussians of per-clip image-model features        (↓ closer to the reference)

The Fréchet features come from a local transformers vision model the user points to (CLIP or
DINOv2, :class:`VisionFeatures`); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from fewstep.errors import UserError
from fewstep.utils.frames import to_uint8
from fewstep.utils.pretrained import resize_center_crop

from .diversity import video_vendi
from .frechet import FrechetStats, frechet_distance

#: ITU-R BT.601 luma weights (Y = 0.299 R + 0.587 G + 0.114 B), as OpenCV's RGB → grey.
LUMA = np.array([0.299, 0.587, 0.114])
#: The 4-neighbour Laplacian stencil (OpenCV's ``cv2.Laplacian`` with ``ksize=1``).
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VENDI_KEYFRAMES = 4  # K of DOLLAR Eq. 17 (at most the clip length)


def _videos(videos) -> np.ndarray:
    """``(n, T, H, W, 3)`` uint8 (numpy or torch), or a one-line error."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().numpy()
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8 or 0 in videos.shape:
        raise UserError(f"videos have shape {videos.shape} and dtype {videos.dtype}; expected (n, T, H, W, 3) uint8")
    return videos


def luminance(frames: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 → ``(...)`` float64 luma in [0, 1] (:data:`LUMA`)."""
    return frames.astype(np.float64) @ LUMA / 255.0


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------

def sharpness(videos) -> float:
    """Variance of the Laplacian (Pech-Pacheco et al., "Diatom autofocusing in brightfield
    microscopy: a comparative study", ICPR 2000), averaged over frames and clips::

        sharpness = mean_{i, t} Var_{x, y}( ∇²Y_{i,t}(x, y) ),   ∇² = [[0, 1, 0], [1, −4, 1], [0, 1, 0]]

    ``Y`` is the BT.601 luminance in [0, 1]; borders are mirrored without repeating the edge pixel
    (OpenCV's default ``BORDER_REFLECT_101``, scipy's ``mirror``). Blur lowers it, a constant frame
    scores 0; pixel noise raises it too, so read it next to the other metrics.
    """
    v = _videos(videos)
    scores = []
    for clip in v:  # one clip at a time: real clips are large
        y = luminance(clip)  # (T, H, W)
        lap = ndimage.correlate(y, LAPLACIAN[None], mode="mirror")  # (T, H, W), per frame
        scores.append(lap.var(axis=(1, 2)).mean())
    return float(np.mean(scores))


def flicker(videos) -> float:
    """Mean absolute difference of consecutive frames over pixels, channels, frames and clips::

        flicker = mean_{i, t, x, y, c} |x_{i,t+1} − x_{i,t}| / 255   ∈ [0, 1]      (0 for T = 1)

    Lower is steadier. VBench's *temporal flickering* is built on this quantity (it reports
    ``1 − flicker`` on videos of static scenes); we report the raw mean, so it also counts real
    motion, and is 0 for a frozen clip (``HealthMonitor`` flags the static case against a reference).
    """
    v = _videos(videos)
    if v.shape[1] < 2:
        return 0.0
    return float(np.mean([np.abs(np.diff(clip.astype(np.int16), axis=0)).mean() / 255.0 for clip in v]))


def vendi(videos, keyframes: int = VENDI_KEYFRAMES) -> float:
    """Diversity of the ``n`` samples of one prompt: DOLLAR Eq. 17 (:func:`~.diversity.video_vendi`)
    on ``min(keyframes, T)`` raw pixel keyframes; 1 = all identical, n = mutually orthogonal."""
    v = _videos(videos)
    return video_vendi(v, keyframes=min(keyframes, v.shape[1]))


def pixel_metrics(videos) -> dict[str, float]:
    """``{"sharpness", "flicker", "vendi"}`` of one prompt's samples."""
    return {"sharpness": sharpness(videos), "flicker": flicker(videos), "vendi": vendi(videos)}


# ---------------------------------------------------------------------------------------------
# Fréchet distance on image-model features
# ---------------------------------------------------------------------------------------------

#: ``config.json`` model_type → what it is (the transformers class is picked in :func:`vision_model_class`).
VISION_MODEL_TYPES = {"clip": "CLIP", "clip_vision_model": "CLIP vision", "dinov2": "DINOv2"}


def vision_model_class(directory: str | Path, what: str = "--features") -> str:
    """The transformers class that loads ``directory`` (``Dinov2Model``, ``CLIPModel``,
    ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``), from its ``config.json`` alone; anything
    else is a one-line error."""
    from fewstep.utils.io import read_json

    directory = Path(directory)
    expected = "a local transformers CLIP (vision) or DINOv2 model directory"
    if not directory.is_dir():
        raise UserError(f"{what} {directory}: no such directory; expected {expected}")
    if not (directory / "config.json").is_file():
        raise UserError(f"{what} {directory}: no config.json; expected {expected}")
    config = read_json(directory / "config.json", f"{what} {directory / 'config.json'}")
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in VISION_MODEL_TYPES:
        raise UserError(f"{what} {directory}: model_type {kind!r} is not a supported vision model; expected "
                        f"{' or '.join(repr(k) for k in VISION_MODEL_TYPES)} (CLIP vision or DINOv2)")
    if kind == "dinov2":
        return "Dinov2Model"
    if kind == "clip":
        return "CLIPModel"
    return ("CLIPVisionModelWithProjection" if "CLIPVisionModelWithProjection" in (config.get("architectures") or [])
            else "CLIPVisionModel")


class VisionFeatures:
    """A local CLIP or DINOv2 model as a per-clip feature map (the Fréchet distance's "Inception").

    A clip's feature is the model's pooled embedding of each frame, *averaged over the frames*::

        f(clip) = (1/T) Σ_t e(frame_t),   e = CLIP: visual_projection(pooled CLS)  (CLIPModel,
                                                    CLIPVisionModelWithProjection); pooled CLS (CLIPVisionModel)
                                              DINOv2: pooled output (layer-normed CLS token)

    Frames are preprocessed as the models' image processors do, in torch: resized so that the shorter
    side is ``size`` (bicubic, antialiased), centre-cropped to ``size × size``, scaled to [0, 1] and
    normalised with the ``image_mean`` / ``image_std`` of ``preprocessor_config.json`` when the
    directory has one, else ImageNet's. ``size`` is the CLIP vision config's ``image_size`` (its
    position embeddings are fixed); for DINOv2 the preprocessor's ``crop_size`` when given, else the
    config's ``image_size``. (The processors first resize to a larger shorter side and then crop; we
    resize to the crop size directly.)
    """

    def __init__(self, model: torch.nn.Module, name: str, size: int, mean, std, directory: Path):
        self.model, self.name, self.size, self.directory = model.eval().requires_grad_(False), name, size, directory
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", what: str = "--features") -> VisionFeatures:
        from fewstep.utils.pretrained import image_processor, load_local

        directory = Path(directory)
        name = vision_model_class(directory, what)
        model = load_local(name, directory, what)
        processor = image_processor(directory, what)
        mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
        config = model.config.vision_config if name == "CLIPModel" else model.config
        size = config.image_size
        crop = processor.get("crop_size")
        if name == "Dinov2Model" and crop is not None:
            size = crop["height"] if isinstance(crop, dict) else int(crop)
        return cls(model.to(device), name, int(size), mean, std, directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> VisionFeatures:
        self.model.to(device)
        return self

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``(m, H, W, 3)`` uint8 → ``(m, 3, S, S)`` normalised pixel values (class doc)."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0  # (m, 3, H, W) in [0, 1]
        x = resize_center_crop(x, self.size).clamp(0, 1)  # (m, 3, S, S)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(m, 3, S, S)`` → ``(m, d)`` pooled frame embeddings (class doc)."""
        if self.name == "Dinov2Model":
            return self.model(pixel_values=pixels).pooler_output
        vision = getattr(self.model, "vision_model", self.model)  # a bare CLIPVisionModel is one in transformers 5
        pooled = vision(pixel_values=pixels).pooler_output  # (m, d_vision)
        projection = getattr(self.model, "visual_projection", None)
        return projection(pooled) if projection is not None else pooled

    @torch.no_grad()
    def features(self, videos, batch_size: int = 64) -> np.ndarray:
        """``(n, T, H, W, 3)`` uint8 → ``(n, d)`` float64: frame embeddings averaged over each clip's frames."""
        v = _videos(videos)
        n, T = v.shape[:2]
        frames = torch.from_numpy(np.ascontiguousarray(v.reshape(n * T, *v.shape[2:])))  # (n·T, H, W, 3)
        out = []
        for lo in range(0, n * T, batch_size):
            pixels = self.preprocess(frames[lo:lo + batch_size].to(self.device))
            out.append(self.embed(pixels).float().cpu())
        return torch.cat(out).reshape(n, T, -1).mean(dim=1).double().numpy()  # (n, d)


def feature_frechet(net: VisionFeatures, videos, reference) -> float:
    """Fréchet distance (:mod:`.frechet`) between the per-clip features of ``videos`` and ``reference``:
    other videos ``(m, T, H, W, 3)`` uint8 or :class:`FrechetStats` (e.g. :func:`cache_reference_stats`).
    With few clips the covariances are rank-deficient and the distance is biased upwards; compare
    values measured on the same number of clips."""
    ref = reference if isinstance(reference, FrechetStats) else FrechetStats.from_features(net.features(reference))
    return frechet_distance(net.features(videos), ref)


def cache_reference_stats(cache, model, net: VisionFeatures, clips: int, batch_size: int = 1,
                          stats_dir: str | Path | None = None) -> FrechetStats:
    """Feature statistics of real clips: the first ``clips`` latents of a latent cache
    (:class:`~fewstep.data.cache.LatentCache`, made by ``fewstep cache``) decoded with ``model``'s decoder.

    With ``stats_dir`` the statistics are kept in ``stats_dir/reference_<key>.npz`` (key: the feature
    model, the cache's inputs and model, the clip count) and read from there next time.
    """
    n = min(clips, len(cache))
    if n < 2:
        raise UserError(f"{cache.where} holds {len(cache)} clip(s); a Fréchet reference needs at least 2")
    if cache.text_only:
        raise UserError(f"{cache.where} is text-only; a Fréchet reference needs a cache of clips (fewstep cache "
                        f"--videos)")
    path = None
    if stats_dir is not None:
        key = json.dumps([str(Path(net.directory).resolve()), cache.settings.inputs_sha256,
                          cache.settings.fingerprint, n], sort_keys=True)
        path = Path(stats_dir) / f"reference_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            return FrechetStats.load(path)
    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            latents = cache.samples(range(lo, min(lo + batch_size, n)))["latents"]  # (b, C, T', H', W') bf16
            videos = to_uint8(model.decode(latents.to(device=device, dtype=torch.float32))).cpu().numpy()
            feats.append(net.features(videos))  # (b, d)
    stats = FrechetStats.from_features(np.concatenate(feats))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        stats.save(tmp)
        tmp.replace(path)
    return stats


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def read_captions(path: str | Path, what: str = "--prompts") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (one caption per line); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file (expected a text file, one caption per line)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UserError(f"{what} {path}: the file holds no caption (one caption per line)")
    return captions
