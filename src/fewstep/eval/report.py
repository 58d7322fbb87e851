"""Evaluation outputs: an HTML report with a GIF grid, videos, and atomic writes.

``write_report(out_dir, [(label, metrics, frames_by_prompt), …])`` writes::

    out_dir/report.html      metrics table (one row per model) and a sample grid: one row per
                             prompt, for each model its first ``max_videos`` videos as GIFs
    out_dir/gifs/*.gif       nearest-neighbour upscaled, looping

The HTML is self-contained apart from the GIFs it references by relative path; it needs no
JavaScript. Files are written atomically (utils/io.py); the commands publish a whole directory of
outputs only once it is complete (:class:`~fewstep.utils.io.OutputDir`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from PIL import Image

from fewstep.errors import UserError
from fewstep.utils.io import write_text_atomic

SUMMARY_KEYS = ("total", "quality", "semantic", "fvd", "vendi_pixel", "vendi_feature", "nfe",
                "seconds_per_video", "steps", "cfg_scale", "jpeg")


# --- videos ----------------------------------------------------------------------------------------------


def upscale(video: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour ``(T, H, W, 3)`` → ``(T, H·scale, W·scale, 3)``."""
    return video.repeat(scale, axis=1).repeat(scale, axis=2)


def write_gif(path: str | Path, video: np.ndarray, fps: int = 8, scale: int = 4) -> Path:
    """A looping GIF of a ``(T, H, W, 3)`` uint8 clip, ×``scale`` nearest neighbour.

    Each frame is palettised at its own resolution (fast octree, ≤ 256 colours — toy clips
    have far fewer) and then enlarged, which keeps encoding cheap.
    """
    frames = []
    for frame in np.asarray(video, dtype=np.uint8):
        small = Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE)
        frames.append(small.resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.Resampling.NEAREST))
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, optimize=False, disposal=1)
    return Path(path)


def write_mp4(path: str | Path, video: np.ndarray, fps: int = 8, scale: int = 8) -> Path:
    """An H.264 mp4 (imageio's bundled ffmpeg, yuv420p) of a ``(T, H, W, 3)`` uint8 clip.

    Tiny frames are upscaled ×``scale`` (nearest neighbour) so players show them, then padded by
    edge replication to even sizes, which yuv420p requires.
    """
    import imageio.v2 as imageio

    frames = upscale(np.asarray(video, dtype=np.uint8), scale)  # (T, H', W', 3)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error", quality=8)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()
    return Path(path)


# --- the report ---------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return html.escape(str(value))


def write_report(out_dir: str | Path, results: list[tuple[str, dict, dict[str, np.ndarray]]],
                 max_videos: int = 4, scale: int = 4, fps: int = 8, title: str = "fewstep evaluation",
                 sections: list[tuple[str, str]] = ()) -> Path:
    """``out_dir/report.html`` + ``out_dir/gifs/`` for ``results`` = ``[(label, metrics,
    {prompt: (n, T, H, W, 3) uint8}), …]`` (module docstring). ``sections`` are extra
    ``(heading, html)`` blocks placed between the table and the samples. Returns the HTML path."""
    out_dir = Path(out_dir)
    gif_dir = out_dir / "gifs"
    gif_dir.mkdir(parents=True, exist_ok=True)
    if not results:
        raise UserError("write_report got no results; expected at least one (label, metrics, frames_by_prompt)")

    # 1. Metrics table: summary keys, then every analyser dimension any model has.
    dims = list(dict.fromkeys(d for _, m, _ in results for d in m.get("dimensions", {})))
    header = ["model", *SUMMARY_KEYS, *dims]
    rows = []
    for label, metrics, _ in results:
        cells = [html.escape(label)] + [_fmt(metrics.get(k)) for k in SUMMARY_KEYS]
        cells += [_fmt(metrics.get("dimensions", {}).get(d)) for d in dims]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
             + "".join(rows) + "</table>")

    # 2. Sample grid: one row per prompt (in the first appearance order), models side by side.
    prompts = list(dict.fromkeys(p for _, _, frames in results for p in frames))
    grid = ["<table class='grid'><tr><th>prompt</th>"]
    for label, _, frames in results:
        n = min(max_videos, max((len(v) for v in frames.values()), default=0))
        grid.append(f"<th colspan='{max(n, 1)}'>{html.escape(label)}</th>")
    grid.append("</tr>")
    for p_index, prompt in enumerate(prompts):
        grid.append(f"<tr><td class='prompt'>{html.escape(prompt)}</td>")
        for m_index, (_, _, frames) in enumerate(results):
            videos = frames.get(prompt, np.zeros((0,)))[:max_videos]
            n = min(max_videos, max((len(v) for v in frames.values()), default=0))
            for j in range(max(n, 1)):
                if j >= len(videos):
                    grid.append("<td></td>")
                    continue
                name = f"m{m_index}_p{p_index:02d}_v{j}.gif"
                write_gif(gif_dir / name, videos[j], fps=fps, scale=scale)
                grid.append(f"<td><img src='gifs/{name}' alt='{html.escape(prompt)}'></td>")
        grid.append("</tr>")
    grid.append("</table>")

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; font-size: 13px; }}
.grid td {{ text-align: center; padding: 2px; }}
.grid td.prompt {{ text-align: left; max-width: 16em; }}
img {{ image-rendering: pixelated; display: block; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Metrics</h2>
<p>total = (4·quality + 1·semantic) / 5 (VBench grouping); fvd: Fréchet distance of toy feature-net
embeddings to real eval clips (lower is better); vendi: effective number of distinct videos per prompt
(DOLLAR Eq. 17); nfe: network evaluations per video; jpeg: −kB per frame of the clip JPEG-encoded as one frame grid.</p>
{table}
{"".join(f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections)}
<h2>Samples</h2>
{"".join(grid)}
</body></html>
"""
    return write_text_atomic(out_dir / "report.html", page)
