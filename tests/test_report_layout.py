"""Layout of the HTML report (eval/report.py) and the demo's loss curves (demo.py): what a reader
sees first, which caption sits above which GIFs, and readable loss names."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fewstep.demo import loss_curves, loss_label, role_label
from fewstep.errors import UserError
from fewstep.eval.report import SUMMARY_KEYS, write_report

DIMS = ("colour", "shape", "motion", "subject_consistency", "background_flicker", "sharpness", "dynamic_degree")
PROMPTS = ("a red circle moves left", "a blue square stays still")


class Page(HTMLParser):
    """The report's structure: the header cells of each table, and each figure's caption + images."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []  # {"class": …, "head": [[cell text, …] per header row]}
        self.figures: list[dict] = []  # {"caption": …, "images": [src, …], "caption_first": bool}
        self.in_head = self.in_caption = self.in_figure = False
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "head": []})
        elif tag == "thead":
            self.in_head = True
        elif tag == "tr" and self.in_head:
            self.tables[-1]["head"].append([])
        elif tag == "th" and self.in_head:
            self.cell = []
        elif tag == "figure":
            self.in_figure = True
            self.figures.append({"caption": None, "images": [], "caption_first": None})
        elif tag == "figcaption" and self.in_figure:
            self.in_caption = True
            self.figures[-1]["caption"] = ""
            self.figures[-1]["caption_first"] = not self.figures[-1]["images"]
        elif tag == "img" and self.in_figure:
            self.figures[-1]["images"].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "thead":
            self.in_head = False
        elif tag == "th" and self.cell is not None:
            self.tables[-1]["head"][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "figure":
            self.in_figure = False
        elif tag == "figcaption":
            self.in_caption = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_caption:
            self.figures[-1]["caption"] += data


def fake_results(models=("teacher · 50 steps", "student <4> steps", "student · 1 step"), n=3):
    rng = np.random.default_rng(0)
    results = []
    for m, label in enumerate(models):
        metrics = {"total": 0.8 - 0.1 * m, "quality": 0.7, "semantic": 0.9, "fvd": 10.0 + m, "vendi_pixel": 2.0,
                   "vendi_feature": 1.5, "nfe": 8 >> m, "seconds_per_video": 0.01, "steps": 4 >> m,
                   "cfg_scale": None, "jpeg": -1.2, "grid": "uniform" if m else "model",
                   "dimensions": {d: float(rng.uniform()) for d in DIMS}}
        frames = {p: rng.integers(0, 256, (n, 3, 8, 8, 3), dtype=np.uint8) for p in PROMPTS}
        results.append((label, metrics, frames))
    return results


def test_report_captions_sit_above_their_own_gifs(tmp_path):
    results = fake_results()
    page_path = write_report(tmp_path, results, max_videos=2, scale=2)
    page = Page()
    page.feed(page_path.read_text())

    # One figure per (prompt, model), in order, each captioned with its model's label before its GIFs.
    assert len(page.figures) == len(PROMPTS) * len(results)
    for i, figure in enumerate(page.figures):
        p_index, m_index = divmod(i, len(results))
        assert figure["caption"] == results[m_index][0]  # escaped in the HTML, the label as text
        assert figure["caption_first"] is True
        assert figure["images"] == [f"gifs/m{m_index}_p{p_index:02d}_v{j}.gif" for j in range(2)]
    # Every referenced GIF exists, at the requested scale, and nothing unreferenced was written.
    srcs = [s for f in page.figures for s in f["images"]]
    assert all((tmp_path / s).is_file() for s in srcs)
    assert sorted(p.name for p in (tmp_path / "gifs").iterdir()) == sorted(s.split("/")[1] for s in srcs)
    with Image.open(tmp_path / srcs[0]) as gif:
        assert gif.size == (16, 16) and gif.n_frames == 3
    assert "&lt;4&gt;" in page_path.read_text() and "<script" not in page_path.read_text()


def test_report_key_columns_come_first_and_dimensions_after(tmp_path):
    page_path = write_report(tmp_path, fake_results(), max_videos=1, scale=1)
    text = page_path.read_text()
    page = Page()
    page.feed(text)
    metrics, dims = page.tables[0], page.tables[1]
    assert metrics["class"] == "metrics" and dims["class"] == "dims"

    # Two-row header: group names over the columns.
    groups, columns = metrics["head"]
    assert groups[0] == "model" and {"sampling", "VBench-style", "distribution", "diversity", "cost"} <= set(groups)
    assert groups.index("sampling") < groups.index("VBench-style") < groups.index("distribution") \
        < groups.index("diversity")
    # Key columns first, in this order, with direction hints; no per-dimension column in the metrics table.
    key = ["steps", "NFE↓", "total↑", "quality↑", "semantic↑", "FVD↓", "Vendi px↑", "Vendi feat↑"]
    assert columns[:len(key)] == key
    assert not any(d in c or d.replace("_", " ") in c for d in DIMS for c in columns)
    assert len(columns) <= 12  # fits a 1400 px window at 13.5 px
    # The dimensions follow, transposed: one column per model, one row per dimension.
    assert dims["head"][0][2:] == [label for label, _, _ in fake_results()]
    assert text.index("class='metrics'") < text.index("class='dims'")
    for d in DIMS:
        assert f"<th class='dim'>{d.replace('_', ' ')}</th>" in text
    # The time grid sits next to the steps; a missing value reads "–"; the best total is bold.
    assert "uniform grid" in text and "model grid" in text
    assert "<td class='first alt best'>0.8</td>" in text  # total: first column of the 2nd group


def test_report_drops_columns_no_model_has(tmp_path):
    results = [(label, {k: v for k, v in m.items() if k not in ("jpeg", "dimensions")}, f)
               for label, m, f in fake_results(n=1)]
    page = Page()
    page.feed(write_report(tmp_path, results, max_videos=1, scale=1).read_text())
    assert len(page.tables) == 1
    assert "reward" not in page.tables[0]["head"][0] and "JPEG↑" not in page.tables[0]["head"][1]
    assert set(SUMMARY_KEYS) >= {"steps", "nfe", "total", "fvd", "vendi_pixel", "jpeg"}


def test_loss_label_reads_like_english():
    assert loss_label("cd/cd") == "consistency distillation"
    assert loss_label("vsd/vsd") == "VSD / DMD (generator)"
    assert loss_label("fake/mse") == "fake-score denoising"
    assert loss_label("loss/fake_score/fake/mse") == "fake-score denoising"
    assert loss_label("lrm/mse") == "latent reward model fit"
    assert loss_label("ft/ft") == "latent reward fine-tuning"
    assert loss_label("traj/traj") == "trajectory guidance"
    assert loss_label("adv_g/adv") == "adversarial (generator)"
    assert loss_label("adv_video/adv") == "adversarial video"
    assert loss_label("flow/mse") == "flow matching"
    assert loss_label("cd/extra") == "consistency distillation · extra"
    assert loss_label("mystery/thing") == "mystery · thing"
    assert loss_label("mystery/mystery") == "mystery"
    assert role_label("fake_score") == "fake score" and role_label("student") == "student"


def test_loss_curves_plot_smoothed_named_series(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        cd, vsd, fake = 0.3 / (i + 1) + 0.01 * rng.random(), 0.2 + 0.05 * rng.random(), 0.1 + 0.01 * rng.random()
        rows.append({"step": 10 * (i + 1), "stage": "dollar", "loss/student": 0.5 * cd + vsd, "loss/student/cd/cd": cd,
                     "loss/student/vsd/vsd": vsd, "loss/fake_score": fake, "loss/fake_score/fake/mse": fake,
                     "grad_norm/student": 1.0, "metric/student/cd/t_start_mean": 0.5})
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    png = loss_curves(jsonl, tmp_path / "losses.png")

    assert png == tmp_path / "losses.png" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["student", "fake score"]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["consistency distillation", "VSD / DMD (generator)", "total (weighted)"],
                       ["fake-score denoising"]]
    # Each named series is a smoothed line over its faint raw line.
    student = fig.axes[0]
    raw, smooth = student.lines[0], student.lines[1]
    assert smooth.get_label() == "consistency distillation" and raw.get_alpha() < 0.5
    assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata()))
    np.testing.assert_allclose(raw.get_ydata(), [r["loss/student/cd/cd"] for r in rows])


def test_loss_curves_needs_loss_rows(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(json.dumps({"step": 1, "grad_norm/student": 1.0}) + "\n")
    with pytest.raises(UserError, match="no loss entries"):
        loss_curves(jsonl, tmp_path / "losses.png")
