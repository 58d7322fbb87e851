"""Evaluation outputs: an HTML report with a GIF grid, videos, and atomic writes.

``write_report(out_dir, [(label, metrics, frames_by_prompt), …])`` writes::

    out_dir/report.html      metrics table (one row per model, key columns first, column groups
                             under a two-row header), dimensions table (one row per analyser
                             dimension, one column per model) and the samples: per prompt, one
                             captioned block per model with its first ``max_videos`` videos as GIFs
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

from .analysers import QUALITY_DIMS, SEMANTIC_DIMS
from .i2v import I2V_DIMS

#: The metrics table's columns in display order, under the group names of its two-row header:
#: ``(group, ((metrics key, header, better, tooltip), …))`` with ``better`` "↑" (higher is
#: better), "↓" (lower is better) or "" (a setting). The key columns come first.
COLUMN_GROUPS: tuple[tuple[str, tuple[tuple[str, str, str, str], ...]], ...] = (
    ("sampling", (
        ("steps", "steps", "", "sampler steps (intervals of the time grid); below: the time grid used"),
        ("nfe", "NFE", "↓", "network evaluations per video (a CFG step counts 2)"),
    )),
    ("VBench-style", (
        ("total", "total", "↑", "(4·quality + 1·semantic) / 5, VBench's grouping"),
        ("quality", "quality", "↑", "mean of the quality dimensions"),
        ("semantic", "semantic", "↑", "mean of the semantic dimensions"),
    )),
    ("VBench-I2V", (
        ("i2v", "I2V", "↑", "image-to-video models: mean of i2v subject and i2v background (eval/i2v.py)"),
        ("total_i2v", "total", "↑", "image-to-video models: (quality + I2V) / 2, VBench-I2V's grouping"),
    )),
    ("distribution", (
        ("fvd", "FVD", "↓", "Fréchet distance of toy feature-net embeddings to real eval clips"),
        ("fd", "FD", "↓", "Fréchet distance of CLIP / DINOv2 frame embeddings (averaged over frames) to real "
                         "clips of a latent cache"),
    )),
    ("pixels", (
        ("sharpness", "sharpness", "↑", "variance of the Laplacian of luminance in [0, 1], mean over frames "
                                       "(noise raises it too)"),
        ("flicker", "flicker", "↓", "mean |frame t+1 − frame t| in [0, 1] (real motion counts too)"),
    )),
    ("diversity", (
        ("vendi_pixel", "Vendi px", "↑", "effective number of distinct videos per prompt, pixel keyframes "
                                        "(DOLLAR Eq. 17)"),
        ("vendi_feature", "Vendi feat", "↑", "effective number of distinct videos per prompt, feature-net "
                                            "embeddings"),
    )),
    ("cost", (
        ("seconds_per_video", "s / video", "↓", "wall clock of sampling + decoding per video"),
    )),
    ("reward", (
        ("jpeg", "JPEG", "↑", "JPEG compressibility: −kB per frame of the clip encoded as one frame grid"),
    )),
    ("setting", (
        ("cfg_scale", "CFG", "", "classifier-free guidance scale (– = none)"),
    )),
)
#: Every metrics key of the table, in column order.
SUMMARY_KEYS = tuple(key for _, columns in COLUMN_GROUPS for key, *_ in columns)


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

#: Groups of the dimensions table (rows); a dimension in neither group is listed under "other".
DIMENSION_GROUPS = (("semantic", SEMANTIC_DIMS), ("quality", QUALITY_DIMS), ("image-to-video", I2V_DIMS))

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 14px 12px;
       color: #1d2330; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 1px solid #d8dce3; padding-bottom: 3px; }
p.note { font-size: 12.5px; color: #4a5263; max-width: 1100px; line-height: 1.45; margin: 6px 0 0; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e3e6eb; text-align: right; white-space: nowrap; }
thead th { background: #eef1f5; font-weight: 600; vertical-align: bottom; }
thead tr.groups th { background: #dfe4ec; text-align: center; font-size: 12px; text-transform: uppercase;
                     letter-spacing: .04em; color: #3a4254; border-bottom: 1px solid #c5ccd8; }
th.model, td.model { text-align: left; font-weight: 600; }
td.model { background: #f7f8fa; }
.metrics tbody tr:hover td { background: #fff7d6; }
.metrics .alt { background: #f5f7fa; }
.metrics .first { border-left: 2px solid #aab3c2; }
.dir { color: #6b7385; font-weight: 400; font-size: 11px; margin-left: 2px; }
.sub { display: block; color: #6b7385; font-size: 11px; font-weight: 400; }
.best { font-weight: 700; }
.dims th.model { text-align: center; white-space: normal; max-width: 9em; }
.dims th.dim { text-align: left; font-weight: 400; }
.dims th.grp { text-align: left; background: #eef1f5; font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; color: #3a4254; vertical-align: top; border-right: 2px solid #aab3c2; }
.dims tbody { border-top: 2px solid #aab3c2; }
.dims td { min-width: 5.5em; }
section.prompt { margin: 0 0 14px; }
section.prompt h3 { font-size: 14.5px; margin: 10px 0 5px; font-weight: 600; }
section.prompt h3 .num { color: #6b7385; font-weight: 400; margin-right: 6px; }
.models { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; padding: 3px; border: 1px solid #d8dce3; border-radius: 4px; background: #f7f8fa; }
figcaption { font-size: 12.5px; font-weight: 600; margin: 0 1px 3px; white-space: nowrap; overflow: hidden;
             text-overflow: ellipsis; }
.gifs { display: grid; gap: 2px; }
.gifs img { image-rendering: pixelated; display: block; }
.none { color: #6b7385; font-size: 12px; padding: 6px; }
body > img { max-width: 100%; height: auto; }
"""


def _fmt(value) -> str:
    """A table cell's text: 4 significant digits, ``–`` for missing or non-finite values."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        if value == 0:
            return "0"
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return html.escape(str(value))


def _number(value) -> float | None:
    """``value`` as a finite float, else None (what "best" and the shading compare)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _best(values: list, better: str) -> set[int]:
    """Indices of the best of ``values`` (ties included); none when fewer than 2 differ."""
    numbers = {i: v for i, v in enumerate(map(_number, values)) if v is not None}
    if better not in ("↑", "↓") or len(set(numbers.values())) < 2:
        return set()
    target = max(numbers.values()) if better == "↑" else min(numbers.values())
    return {i for i, v in numbers.items() if v == target}


def _metrics_table(results: list[tuple[str, dict, dict]]) -> str:
    """One row per model; the columns of :data:`COLUMN_GROUPS` that any model has, under a
    two-row header (group names, then column names with ↑ / ↓), groups on alternating
    backgrounds with a rule between them, the best value of each ↑ / ↓ column in bold."""
    groups = [(name, [c for c in columns if any(m.get(c[0]) is not None for _, m, _ in results)])
              for name, columns in COLUMN_GROUPS]
    groups = [(name, columns) for name, columns in groups if columns]
    top = ["<th rowspan='2' class='model'>model</th>"]
    names = []
    for g, (name, columns) in enumerate(groups):
        shade = " alt" if g % 2 else ""
        top.append(f"<th colspan='{len(columns)}' class='first{shade}'>{html.escape(name)}</th>")
        for c, (_, header, better, tip) in enumerate(columns):
            cls = ("first" if c == 0 else "") + shade
            arrow = f"<span class='dir'>{better}</span>" if better else ""
            names.append(f"<th class='{cls.strip()}' title='{html.escape(tip)}'>{html.escape(header)}{arrow}</th>")
    cells: list[list[str]] = [[f"<td class='model'>{html.escape(label)}</td>"] for label, _, _ in results]
    for g, (_, columns) in enumerate(groups):
        for c, (key, _, better, _) in enumerate(columns):
            values = [m.get(key) for _, m, _ in results]
            best = _best(values, better)
            for i, (value, (_, metrics, _)) in enumerate(zip(values, results)):
                cls = " ".join(x for x in ("first" if c == 0 else "", "alt" if g % 2 else "",
                                           "best" if i in best else "") if x)
                text = _fmt(value)
                if key == "steps" and metrics.get("grid") is not None:
                    text += f"<span class='sub'>{_fmt(metrics['grid'])} grid</span>"
                cells[i].append(f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>")
    rows = "".join("<tr>" + "".join(row) + "</tr>" for row in cells)
    return (f"<table class='metrics'><thead><tr class='groups'>{''.join(top)}</tr><tr>{''.join(names)}</tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _dimensions_table(results: list[tuple[str, dict, dict]]) -> str:
    """The analyser dimensions transposed: one row per dimension (grouped semantic / quality /
    other), one column per model, so that any number of dimensions fits the page width. Cells
    are shaded by score (all dimensions are in [0, 1], higher is better); the best is bold."""
    dims = list(dict.fromkeys(d for _, m, _ in results for d in m.get("dimensions", {})))
    if not dims:
        return ""
    known = {d for _, members in DIMENSION_GROUPS for d in members}
    groups = [(name, [d for d in members if d in dims]) for name, members in DIMENSION_GROUPS]
    groups.append(("other", [d for d in dims if d not in known]))
    head = ("<thead><tr><th class='model'>group</th><th class='model' style='text-align:left'>dimension"
            "<span class='dir'>↑</span></th>"
            + "".join(f"<th class='model'>{html.escape(label)}</th>" for label, _, _ in results) + "</tr></thead>")
    bodies = []
    for name, members in groups:
        if not members:
            continue
        rows = []
        for r, dim in enumerate(members):
            values = [m.get("dimensions", {}).get(dim) for _, m, _ in results]
            best = _best(values, "↑")
            row = [f"<th rowspan='{len(members)}' class='grp'>{html.escape(name)}</th>"] if r == 0 else []
            row.append(f"<th class='dim'>{html.escape(dim.replace('_', ' '))}</th>")
            for i, value in enumerate(values):
                v = _number(value)
                style = (f" style='background: rgba(46, 160, 67, {0.04 + 0.36 * v:.2f})'"
                         if v is not None and 0.0 <= v <= 1.0 else "")
                cls = " class='best'" if i in best else ""
                row.append(f"<td{cls}{style}>{_fmt(value)}</td>")
            rows.append("<tr>" + "".join(row) + "</tr>")
        bodies.append("<tbody>" + "".join(rows) + "</tbody>")
    return f"<table class='dims'>{head}{''.join(bodies)}</table>"


def write_report(out_dir: str | Path, results: list[tuple[str, dict, dict[str, np.ndarray]]],
                 max_videos: int = 4, scale: int = 4, fps: int = 8, title: str = "fewstep evaluation",
                 sections: list[tuple[str, str]] = ()) -> Path:
    """``out_dir/report.html`` + ``out_dir/gifs/`` for ``results`` = ``[(label, metrics,
    {prompt: (n, T, H, W, 3) uint8}), …]`` (module docstring). ``sections`` are extra
    ``(heading, html)`` blocks placed between the tables and the samples. Returns the HTML path.

    Layout (fits a 1400 px window): the metrics table (key columns first, grouped), the
    dimensions table (transposed: dimensions as rows, models as columns), ``sections``, then the
    samples: per prompt a heading and one ``<figure>`` per model — its label as the caption
    above its first ``max_videos`` GIFs in a near-square grid (2 × 2 for 4) — in a wrapping row.
    GIFs are ``gifs/m{model}_p{prompt:02d}_v{j}.gif`` (indices in ``results`` / first-appearance
    prompt order)."""
    out_dir = Path(out_dir)
    gif_dir = out_dir / "gifs"
    gif_dir.mkdir(parents=True, exist_ok=True)
    if not results:
        raise UserError("write_report got no results; expected at least one (label, metrics, frames_by_prompt)")

    # 1. Tables: the summary metrics, then the per-dimension scores.
    table = _metrics_table(results)
    dims_table = _dimensions_table(results)

    # 2. Samples: per prompt (first appearance order), a wrapping row of one figure per model.
    prompts = list(dict.fromkeys(p for _, _, frames in results for p in frames))
    samples = []
    for p_index, prompt in enumerate(prompts):
        samples.append(f"<section class='prompt'><h3><span class='num'>{p_index + 1}.</span>"
                       f"{html.escape(prompt)}</h3><div class='models'>")
        for m_index, (label, _, frames) in enumerate(results):
            videos = frames.get(prompt, np.zeros((0,)))[:max(max_videos, 0)]
            samples.append(f"<figure><figcaption title='{html.escape(label)}'>{html.escape(label)}</figcaption>")
            if not len(videos):
                samples.append("<div class='none'>no samples</div></figure>")
                continue
            cols = math.ceil(math.sqrt(len(videos)))
            samples.append(f"<div class='gifs' style='grid-template-columns: repeat({cols}, auto)'>")
            for j, video in enumerate(videos):
                name = f"m{m_index}_p{p_index:02d}_v{j}.gif"
                write_gif(gif_dir / name, video, fps=fps, scale=scale)
                height, width = video.shape[1] * scale, video.shape[2] * scale
                alt = html.escape(f"{label}: {prompt} (#{j + 1})")
                samples.append(f"<img src='gifs/{name}' width='{width}' height='{height}' alt='{alt}' "
                               f"title='{alt}'>")
            samples.append("</div></figure>")
        samples.append("</div></section>")

    extra = "".join(f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Metrics</h2>
{table}
<p class="note">↑ higher is better, ↓ lower is better; the best value of each column is bold (hover a header
for its definition). total = (4·quality + 1·semantic) / 5 (VBench grouping); FVD: Fréchet distance of toy
feature-net embeddings to real eval clips; Vendi: effective number of distinct videos per prompt (DOLLAR
Eq. 17) on pixel keyframes (px) or feature-net embeddings (feat); NFE: network evaluations per video (a CFG
step counts 2); JPEG: −kB per frame of the clip JPEG-encoded as one frame grid.</p>
{f'<h2>Dimensions</h2>{dims_table}<p class="note">Toy-VBench analyser scores in [0, 1], higher is better; '
 'quality = mean of the quality rows, semantic = mean of the semantic rows. Shading follows the score.</p>'
 if dims_table else ''}
{extra}
<h2>Samples</h2>
{"".join(samples)}
</body></html>
"""
    return write_text_atomic(out_dir / "report.html", page)
