"""Trajectory stores of real (diffusers) teachers: bf16 latents, each caption's text once in a text table
(context, mask and the condition's extras), served back as float32; format-1 stores still read; resumed
runs refuse another prompt file or a damaged text table."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.data.trajectories import TEXTS, TrajectoryStore, key_indices, solver_grid, write_text_table
from fewstep.diffusion.samplers import sample_euler
from fewstep.errors import UserError
from fewstep.models.family import load_model
from fewstep.recipes.sources import TrajectorySource
from fewstep.synth import sample_noise, synthesize
from fewstep.utils.io import sha256_file
from helpers import cli, losses, make_tiny_hunyuan_pipeline, make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = "a cat runs in the park\na red circle moves left\n"
#: bf16 keeps 8 significant bits: rounding to it moves a value by at most 2⁻⁸ of itself.
BF16 = dict(rtol=2**-8, atol=1e-6)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def synth_args(teacher, prompts, out, *more):
    return ["synth", "--teacher", teacher, "--prompts", prompts, "--num", 6, "--steps", 10, "--batch-size", 4,
            "--shard-size", 4, "--out", out, *more]


@pytest.fixture(scope="module")
def wan_store(wan_dir, prompt_file, tmp_path_factory):
    """6 samples of a 2-line prompt file, shards of 4 + 2, through the CLI (``--dtype auto``)."""
    from fewstep.cli import main

    out = tmp_path_factory.mktemp("wan_store") / "store"
    threads = torch.get_num_threads()  # a module fixture runs before the function-scoped one_thread
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in synth_args(wan_dir, prompt_file, out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir())


# ------------------------------------------------------------------------------------ the text table file
def test_streamed_text_table_is_plain_safetensors(tmp_path):
    """Written in batches that do not divide P, read back whole by safetensors itself and row by row."""
    g = torch.Generator().manual_seed(0)
    table = {"context": torch.randn(7, 5, 3, generator=g).bfloat16(), "mask": torch.rand(7, 5, generator=g) > 0.5,
             "extra.pooled_projections": torch.randn(7, 4, generator=g).bfloat16()}
    captions = [f"caption {j} — ünïcode" for j in range(7)]
    index = {c: j for j, c in enumerate(captions)}

    def encode(batch):
        rows = [index[c] for c in batch]
        return {k: v[rows] for k, v in table.items()}

    info = write_text_table(tmp_path / TEXTS, captions, encode, batch_size=3)
    assert info.count == 7 and info.bytes == (tmp_path / TEXTS).stat().st_size and not list(tmp_path.glob(".*"))
    whole = load_file(tmp_path / TEXTS)
    assert json.loads(bytes(whole.pop("captions").numpy()).decode()) == captions
    assert whole.keys() == table.keys()
    for key, value in table.items():
        assert whole[key].dtype == value.dtype and torch.equal(whole[key], value), key


# ------------------------------------------------------------------------------------ a Wan store
def test_wan_store_holds_each_caption_once_and_bf16_latents(wan_store, wan_dir, prompt_file):
    store = TrajectoryStore(wan_store)
    s = store.settings
    assert store.manifest.format == 2 and store.complete and s.dtype == "bfloat16" and s.num_texts == 2
    assert s.cfg_scale == 5.0 and s.extra_shapes == {}
    texts = load_file(wan_store / TEXTS)
    assert texts["context"].shape == (2, 16, 16) and texts["context"].dtype == torch.bfloat16
    assert json.loads(bytes(texts["captions"].numpy()).decode()) == PROMPTS.split("\n")[:2]
    shards = [load_file(wan_store / info.file) for info in store.manifest.shards]
    assert [sorted(t) for t in shards] == [["index", "latents", "text_index"]] * 2  # no caption tokens per sample
    assert all(t["latents"].dtype == torch.bfloat16 for t in shards)
    assert torch.cat([t["text_index"] for t in shards]).tolist() == [0, 1, 0, 1, 0, 1]  # line i mod 2

    # the teacher's own path (float32, its own caption encoding, CFG 5), read at the key times
    items = store.samples(range(6))
    assert items["latents"].dtype == torch.float32 and items["prompts"] == PROMPTS.split("\n")[:2] * 3
    pipe = load_model(wan_dir)
    cond = pipe.encode_prompts(items["prompts"])
    grid = solver_grid(10)
    with torch.no_grad():
        path = sample_euler(pipe.denoiser, sample_noise(s.latent_shape, 0, range(6)), grid, cond, cfg_scale=5.0,
                            uncond=pipe.null_condition(6), return_trajectory=True)
    expected = torch.stack(path.trajectory, 1)[:, key_indices(grid)]  # (6, K, C, T, H, W)
    torch.testing.assert_close(items["latents"], expected, **BF16)
    assert torch.equal(items["latents"], items["latents"].bfloat16().float())  # bf16 values, served as float32

    # the data source: the stored caption (float32) equals the text encoder's to bf16 rounding
    batch = TrajectorySource(wan_store, pipe).batch([0, 1, 2, 9], torch.device("cpu"))
    want = pipe.encode_prompts([items["prompts"][p % 6] for p in (0, 1, 2, 9)])
    assert batch.cond.context.dtype == torch.float32 and batch.cond.extra == {}
    torch.testing.assert_close(batch.cond.context, want.context, **BF16)
    assert torch.equal(batch.cond.mask, want.mask)
    torch.testing.assert_close(batch.extra["trajectory"], items["latents"][[0, 1, 2, 3]], rtol=0, atol=0)


def test_fp32_store_is_the_float32_path_and_larger(wan_store, wan_dir, prompt_file, tmp_path, capsys):
    rc, stdout, err = cli(capsys, *synth_args(wan_dir, prompt_file, tmp_path / "fp32", "--dtype", "fp32"))
    assert rc == 0 and "6 trajectories (2 shards, 2 captions, float32" in stdout, err
    full, half = TrajectoryStore(tmp_path / "fp32"), TrajectoryStore(wan_store)
    a, b = full.samples(range(6)), half.samples(range(6))
    torch.testing.assert_close(b["latents"], a["latents"], **BF16)
    torch.testing.assert_close(b["context"], a["context"], **BF16)
    assert torch.equal(a["latents"].bfloat16().float(), b["latents"])  # the same solve, rounded once
    assert store_bytes(tmp_path / "fp32") > store_bytes(wan_store)


# ------------------------------------------------------------------------------------ resume
def test_resume_with_a_changed_prompt_file_is_refused(wan_store, wan_dir, tmp_path, capsys):
    out, prompts = tmp_path / "store", tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    rc, _, err = cli(capsys, *synth_args(wan_dir, prompts, out))
    assert rc == 0, err
    (out / "shard_00001.safetensors").unlink()  # as if interrupted: the rerun would regenerate it
    prompts.write_text("a dog runs in the park\na red circle moves left\n")
    rc, _, err = cli(capsys, *synth_args(wan_dir, prompts, out))
    assert rc == 2 and err.count("\n") == 1 and "holds a trajectory store of other prompts" in err, err
    assert not (out / "shard_00001.safetensors").exists()

    prompts.write_text(PROMPTS)  # the same file again: the missing shard comes back, bit for bit
    rc, _, err = cli(capsys, *synth_args(wan_dir, prompts, out))
    assert rc == 0, err
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", TEXTS):
        got, want = load_file(out / name), load_file(wan_store / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("damage,message", [
    ("delete", f"{TEXTS} is missing"),
    ("flip", f"{TEXTS} does not match its checksum"),
])
def test_resume_with_a_damaged_text_table_is_refused(wan_store, wan_dir, prompt_file, tmp_path, capsys, damage,
                                                      message):
    out = tmp_path / "store"
    shutil.copytree(wan_store, out)
    (out / "shard_00001.safetensors").unlink()
    table = out / TEXTS
    if damage == "delete":
        table.unlink()
    else:  # same size, other bytes
        data = bytearray(table.read_bytes())
        data[-3] ^= 0xFF
        table.write_bytes(bytes(data))
    rc, _, err = cli(capsys, *synth_args(wan_dir, prompt_file, out))
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (out / "shard_00001.safetensors").exists()  # nothing was generated against it


def test_an_interrupted_text_table_starts_the_store_afresh(wan_store, wan_dir, prompt_file, tmp_path, monkeypatch):
    """A run that dies while writing the text table leaves a store without samples: the rerun starts over."""
    import fewstep.data.trajectories as traj_module

    out = tmp_path / "store"
    real = traj_module._raw_bytes
    calls = {"n": 0}

    def crash(t):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first tensor of the first batch
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(traj_module, "_raw_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        synthesize(wan_dir, out, 6, prompts=str(prompt_file), steps=10, batch_size=4, shard_size=4)
    monkeypatch.undo()
    assert not (out / TEXTS).exists() and list(out.glob(".*.tmp"))  # the table never became visible
    synthesize(wan_dir, out, 6, prompts=str(prompt_file), steps=10, batch_size=4, shard_size=4)
    assert not list(out.glob(".*"))
    for name in ("shard_00000.safetensors", TEXTS):
        got, want = load_file(out / name), load_file(wan_store / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name


# ------------------------------------------------------------------------------------ HunyuanVideo
def test_hunyuan_pooled_projection_survives_store_to_batch(tmp_path, capsys):
    teacher = make_tiny_hunyuan_pipeline(tmp_path / "hunyuan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    rc, _, err = cli(capsys, "synth", "--teacher", teacher, "--prompts", prompts, "--num", 3, "--steps", 5,
                     "--out", tmp_path / "store")
    assert rc == 0, err
    store = TrajectoryStore(tmp_path / "store")
    assert store.settings.extra_shapes == {"pooled_projections": [8]} and store.settings.dtype == "bfloat16"
    pipe = load_model(teacher)
    batch = TrajectorySource(store, pipe).batch([0, 1, 2], torch.device("cpu"))
    want = pipe.encode_prompts(PROMPTS.split("\n")[:2] + PROMPTS.split("\n")[:1])
    assert batch.cond.extra.keys() == {"pooled_projections"}
    torch.testing.assert_close(batch.cond.extra["pooled_projections"], want.extra["pooled_projections"], **BF16)
    torch.testing.assert_close(batch.cond.context, want.context, **BF16)
    assert torch.equal(batch.cond.mask, want.mask)
    # the served condition drives the teacher (its transformer needs the pooled projection)
    with torch.no_grad():
        pred = pipe.denoiser.predict(batch.extra["trajectory"][:, 1], batch.extra["key_times"][:, 1], batch.cond)
    assert torch.isfinite(pred.x0).all()
    # and AccVideo trains from the store
    run = tmp_path / "run"
    sets = [f"model={teacher}", "train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.log_every=1",
            "train.tensorboard=false", f"data={tmp_path / 'store'}"]
    rc, _, err = cli(capsys, "distill", "--recipe", "accvideo", "--out", run, *[a for s in sets for a in ("--set", s)])
    assert rc == 0, err
    assert sorted(losses(run)) == [1, 2] and all(math.isfinite(v) for rec in losses(run).values() for v in rec.values())


# ------------------------------------------------------------------------------------ format 1
def write_format1(store: TrajectoryStore, out: Path) -> None:
    """The layout fewstep wrote before the text table: per-sample float32 caption tokens in every shard,
    the prompts as header metadata, no dtype / text-table keys in the manifest."""
    out.mkdir()
    shards = []
    for info in store.manifest.shards:
        rows = range(info.start, info.start + info.count)
        items = store.samples(rows)
        path = out / info.file
        save_file({"index": torch.tensor(list(rows)), "latents": items["latents"], "text_tokens": items["context"],
                   "text_mask": items["mask"]}, path, metadata={"prompts": json.dumps(items["prompts"])})
        shards.append({"file": info.file, "start": info.start, "count": info.count, "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
    settings = store.settings.model_dump(exclude={"dtype", "num_texts", "extra_shapes"})
    (out / "manifest.json").write_text(json.dumps({"format": 1, "settings": settings, "shards": shards}))


def test_a_format1_store_still_reads_and_trains(teacher_dir, tmp_path, capsys):
    new = synthesize(teacher_dir, tmp_path / "new", 5, steps=5, batch_size=2, shard_size=3)
    assert new.settings.dtype == "float32"  # auto: the toy model's stores stay float32
    write_format1(new, tmp_path / "old")
    old = TrajectoryStore(tmp_path / "old")
    assert old.manifest.format == 1 and old.settings.dtype == "float32" and old.settings.num_texts is None
    a, b = old.samples([4, 0, 2]), new.samples([4, 0, 2])
    assert a["prompts"] == b["prompts"] and a["extra"] == b["extra"] == {}
    for key in ("latents", "context", "mask"):
        assert torch.equal(a[key], b[key]), key
    pipe = make_tiny_pipeline()
    got, want = (TrajectorySource(s, pipe).batch([1, 7], torch.device("cpu")) for s in (old, new))
    assert torch.equal(got.cond.context, want.cond.context) and torch.equal(got.latents, want.latents)

    # continuing it is refused in one line (it trains as it is); --overwrite makes a format-2 store
    args = ["synth", "--teacher", teacher_dir, "--num", 5, "--steps", 5, "--batch-size", 2, "--shard-size", 3,
            "--out", tmp_path / "old"]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and "holds a format-1 trajectory store" in err, err
    rc, _, err = cli(capsys, *args, "--overwrite")
    assert rc == 0 and TrajectoryStore(tmp_path / "old").manifest.format == 2, err


def test_a_format1_store_without_the_models_extras_is_refused(tmp_path):
    """A HunyuanVideo store of format 1 dropped the pooled projection: refused, saying to re-synthesize."""
    from fewstep.models.backbones import Conditioning

    class WithPooled:  # the toy model, as if its text encoder also gave a pooled projection
        def __init__(self, model):
            self.model = model

        def latent_shape(self, batch):
            return self.model.latent_shape(batch)

        def null_condition(self, batch):
            null = self.model.null_condition(batch)
            return Conditioning(null.context, null.mask, {"pooled_projections": torch.zeros(batch, 8)})

    teacher = tmp_path / "teacher"
    make_tiny_pipeline().save(teacher)
    write_format1(synthesize(teacher, tmp_path / "new", 2, steps=5), tmp_path / "old")
    with pytest.raises(UserError, match=r"caption extras \{\}; the model's text encoder gives "
                                        r"\{'pooled_projections': \[8\]\} \(a format-1 store keeps none"):
        TrajectorySource(tmp_path / "old", WithPooled(make_tiny_pipeline()))
