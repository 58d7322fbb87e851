"""`fewstep cache` and the ``latent_cache`` data source on a tiny random WanPipeline built here: cached
latents and captions are the model's own encodings of the independently sampled, resized and cropped
frames; bad videos are skipped and counted; CSV/JSONL inputs, resume, idempotence, refusal of another
model, the rank split, text-only caches, and a finetune run that reads only the cache."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fewstep.data.cache as cache_module
from fewstep.cache import build_cache
from fewstep.data.cache import LatentCache, merge_cache, model_fingerprint, read_inputs, read_manifest
from fewstep.errors import UserError
from fewstep.models.family import load_model
from fewstep.recipes.sources import LatentCacheData, LatentCacheSource, parse_data_config
from helpers import cli, make_tiny_wan_pipeline, sets

BF16 = torch.bfloat16
#: the kept clips of the test folder: file → (caption, source frames of the 9 output frames at 16 fps,
#: (rows, columns) of the resized frame, (top, left) of the 32 × 32 crop)
KEPT = {
    "a.mp4": ("a cat runs in the park", list(range(9)), (32, 38), (0, 3)),  # 40×48 at 16 fps: ×0.8
    "b.mp4": ("a dog runs", list(range(0, 18, 2)), (32, 64), (0, 16)),  # 32×64 at 32 fps: every 2nd frame
    "c.gif": ("a red circle moves left", [0, 1, 1, 2, 3, 3, 4, 4, 5], (32, 32), (0, 0)),  # 24² at 10 fps: ×4/3
}
SKIPPED = {"bad.mp4": "unreadable", "nocap.mp4": "no caption", "short.mp4": "too short"}
ARGS = ["--batch-size", 2, "--shard-size", 2, "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    """One torch thread for the whole module (module fixtures included), so encodings are bit-stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_mp4(path, frames, fps):
    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error", quality=8)
    for frame in frames:
        writer.append_data(frame)
    writer.close()


def random_frames(rng, n, h, w):
    """Smooth random frames (a codec keeps them closer than noise): (n, h, w, 3) uint8."""
    small = rng.random((n, 3, max(h // 8, 1), max(w // 8, 1)), dtype=np.float32)
    big = F.interpolate(torch.from_numpy(small), size=(h, w), mode="bilinear", align_corners=False)
    return (big.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def wan(wan_dir):
    return load_model(wan_dir)


@pytest.fixture(scope="module")
def other_wan_dir(tmp_path_factory):
    """The same tiny pipeline made with another seed: another VAE and text encoder, the same configs."""
    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("other") / "wan", seed=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """a.mp4 40×48 · b.mp4 32×64 · c.gif 24² · bad.mp4 (garbage) · nocap.mp4 (no .txt) · short.mp4 (5 frames)"""
    root = tmp_path_factory.mktemp("data") / "videos"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_mp4(root / "a.mp4", random_frames(rng, 12, 40, 48), fps=16)
    write_mp4(root / "b.mp4", random_frames(rng, 20, 32, 64), fps=32)
    imageio.mimsave(root / "c.gif", list(random_frames(rng, 6, 24, 24)), duration=100, loop=0)  # 10 fps
    (root / "bad.mp4").write_bytes(rng.bytes(400))
    write_mp4(root / "nocap.mp4", random_frames(rng, 12, 32, 32), fps=16)
    write_mp4(root / "short.mp4", random_frames(rng, 5, 32, 32), fps=16)
    for name, (caption, *_) in KEPT.items():
        (root / name).with_suffix(".txt").write_text(caption + "\n")
    (root / "bad.txt").write_text("a blue square")
    (root / "short.txt").write_text("a green triangle")
    return root


@pytest.fixture(scope="module")
def built(wan_dir, videos, tmp_path_factory):
    """The cache of the folder, made in one CLI run (3 shards of 2 items; 3 clips kept)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    from fewstep.cli import main

    assert main(["cache", "--model", str(wan_dir), "--videos", str(videos), "--out", str(out),
                 *map(str, ARGS)]) == 0
    return out


def files(directory):
    """Every file's sha256 by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def expected_frames(videos, name):
    """The clip as the cache must fit it, computed here from the hand-derived frames, size and crop."""
    _, indices, size, (top, left) = KEPT[name]
    decoded = np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(videos / name)])  # (N, h, w, 3)
    x = torch.from_numpy(decoded[indices]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (9, 3, h, w)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[:, :, top:top + 32, left:left + 32].clamp(-1, 1).permute(0, 2, 3, 1)  # (9, 32, 32, 3)


# ------------------------------------------------------------------------------------ contents
def test_cached_latents_and_captions_are_the_models_encodings(built, videos, wan):
    cache = LatentCache(built)
    assert len(cache) == 3
    items = cache.samples([0, 1, 2])
    assert items["paths"] == list(KEPT) and items["captions"] == [c for c, *_ in KEPT.values()]
    assert items["index"].tolist() == [0, 1, 3]  # input items a, b, c (bad.mp4 is item 2)
    assert items["latents"].dtype == BF16 and items["context"].dtype == BF16 and items["mask"].dtype == torch.bool
    with torch.no_grad():
        frames = torch.stack([expected_frames(videos, name) for name in KEPT])  # (3, 9, 32, 32, 3)
        latents = torch.cat([wan.encode(frames[:2]), wan.encode(frames[2:])])  # (3, 4, 3, 4, 4), the cache's batches
        cond = wan.encode_prompts(items["captions"])
        null = wan.null_condition(1)
    assert items["latents"].shape == latents.shape == (3, 4, 3, 4, 4)
    assert torch.equal(items["latents"], latents.to(BF16))  # the same frames, so the same latents, bit for bit
    assert torch.equal(items["context"], cond.context.to(BF16)) and torch.equal(items["mask"], cond.mask)
    assert torch.equal(cache.null_context, null.context.to(BF16)) and torch.equal(cache.null_mask, null.mask)


def test_bad_videos_are_skipped_and_counted(built):
    manifest = read_manifest(built)
    assert manifest.complete and manifest.count == 3 and len(manifest.shards) == 3
    assert manifest.skipped == {"no caption": 1, "too short": 1, "unreadable": 1}
    assert {s.path: s.reason for s in manifest.skipped_items} == SKIPPED
    assert manifest.shards[2].count == 0 and manifest.shards[2].file is None  # nocap + short: no file
    s = manifest.settings
    assert (s.frames, s.height, s.width, s.fps, s.latent_shape, s.text_shape) == (9, 32, 32, 16.0, [4, 3, 4, 4],
                                                                                 [16, 16])


def test_csv_and_jsonl_inputs(built, videos, wan, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [(f"../{videos.name}/{name}", caption) for name, (caption, *_) in KEPT.items()][:2]
    rows.append(("missing.mp4", "a cat"))
    (lists / "data.csv").write_text("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows))
    (lists / "data.jsonl").write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    shutil.copytree(videos, tmp_path / videos.name)
    reference = LatentCache(built).samples([0, 1])
    for name in ("data.csv", "data.jsonl"):
        run = build_cache(wan, read_inputs(videos=lists / name), tmp_path / name, batch_size=2, shard_size=2)
        cache = LatentCache(tmp_path / name)
        assert run.manifest.skipped == {"missing file": 1} and len(cache) == 2
        got = cache.samples([0, 1])
        assert got["captions"] == reference["captions"]
        for key in ("latents", "context", "mask"):
            assert torch.equal(got[key], reference[key]), (name, key)


# ------------------------------------------------------------------------------------ resume, reruns, refusals
@pytest.mark.parametrize("where", ["mid-shard", "writing a shard"])
def test_interrupted_cache_resumes_to_the_same_files(built, videos, wan, wan_dir, tmp_path, monkeypatch, where):
    out, inputs = tmp_path / "cache", read_inputs(videos=videos)
    kwargs = {"batch_size": 2, "shard_size": 2, "model_name": str(wan_dir)}
    progress = None
    if where == "mid-shard":  # stopped after the first item of shard 1
        def progress(stage, done, total, metrics):
            if done == 3:
                raise KeyboardInterrupt
    else:  # shard 1 dies halfway through its temporary file
        real, calls = cache_module.write_bytes_atomic, {"n": 0}

        def crash(path, data):
            calls["n"] += 1
            if calls["n"] == 3:  # 1: null, 2: shard 0, 3: shard 1
                (path.parent / f".{path.name}.half").write_bytes(data[:100])
                raise KeyboardInterrupt
            return real(path, data)

        monkeypatch.setattr(cache_module, "write_bytes_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cache(wan, inputs, out, progress=progress, **kwargs)
    monkeypatch.undo()
    assert not read_manifest(out).complete
    with pytest.raises(UserError, match="is incomplete"):
        LatentCache(out)
    run = build_cache(wan, inputs, out, **kwargs)  # the same command again
    assert run.written == 2 and run.manifest.complete  # shards 1 and 2; shard 0 was finished
    assert files(out) == files(built)  # every file bit for bit, manifest included


def test_rerun_is_idempotent(built, wan_dir, videos, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(built, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, stdout, err = cli(capsys, "cache", "--model", wan_dir, "--videos", videos, "--out", out, *ARGS)
    assert rc == 0, err
    assert f"cache {out} is complete (3 clips, 3 skipped); nothing to do" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("flags,message", [
    (["--seed-1-model"], "holds a latent cache built with another model ("),
    (["--width", "64"], "holds a cache of 9×32×32 clips (frames × height × width; this run: 9×32×64)"),
    (["--fps", "8"], "made with fps=16.0 (this run: 8.0)"),
])
def test_another_model_or_geometry_is_refused_and_nothing_changes(built, wan_dir, other_wan_dir, videos, capsys,
                                                                  flags, message):
    model = wan_dir
    if flags == ["--seed-1-model"]:
        model, flags = other_wan_dir, []
    before = files(built)
    rc, _, err = cli(capsys, "cache", "--model", model, "--videos", videos, "--out", built, *ARGS, *flags)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {built} "), err
    assert message in err, err
    assert files(built) == before


def test_fingerprint_tells_models_apart_but_not_dtypes(wan, wan_dir, other_wan_dir):
    other = load_model(other_wan_dir)
    a, b = model_fingerprint(wan), model_fingerprint(other)
    assert a["latents"] != b["latents"] and a["text"] != b["text"]
    assert model_fingerprint(load_model(wan_dir)) == a
    assert model_fingerprint(load_model(wan_dir).to(BF16)) == a  # a cache made in bf16 serves an fp32 model


@pytest.mark.parametrize("argv,message", [
    (["--prompts", "p.txt"], "give exactly one of --videos"),
    (["--videos", "nowhere"], "--videos nowhere: no such folder or file"),
    (["--videos", "bad.csv"], "--videos bad.csv: the CSV needs a header with columns 'path' and 'caption'"),
    (["--videos", "bad.jsonl"], "--videos bad.jsonl line 2: not valid JSON"),
    (["--videos", "p.txt"], "expected a folder of videos, a .csv or a .jsonl file"),
    (["--dtype", "fp16"], "--dtype must be auto, bf16 or fp32"),
    (["--height", "30"], "--height 30: must be a multiple of 16"),  # a size the VAE and patches cannot take
    (["--frames", "8"], "--frames 8: this model's VAE takes 4k + 1 frames"),
])
def test_bad_input_is_one_line_exit_2(wan_dir, videos, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "bad.csv").write_text("file,text\nx.mp4,a cat\n")
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4", "caption": "a"}\n{oops\n')
    extra = ["--videos", videos] if argv[0] in ("--prompts", "--dtype", "--height", "--frames") else []
    rc, _, err = cli(capsys, "cache", "--model", wan_dir, *extra, *argv, "--out", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_out_that_is_not_a_cache_is_refused(wan_dir, videos, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "cache", "--model", wan_dir, "--videos", videos, "--out", tmp_path / "out")
    assert rc == 2 and "exists and is not a latent cache" in err and err.count("\n") == 1, err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------ processes
def test_ranks_split_the_shards_and_rank_0_merges(built, videos, wan, wan_dir, tmp_path):
    out, inputs = tmp_path / "cache", read_inputs(videos=videos)
    kwargs = {"batch_size": 2, "shard_size": 2, "model_name": str(wan_dir), "world_size": 2}
    first = build_cache(wan, inputs, out, rank=0, **kwargs)  # shards 0 and 2, then merges what is finished
    assert first.written == 2 and not first.manifest.complete and [s.shard for s in first.manifest.shards] == [0, 2]
    second = build_cache(wan, inputs, out, rank=1, **kwargs)  # shard 1; only rank 0 writes the manifest
    assert second.written == 1 and second.manifest is None
    assert merge_cache(out).complete  # what rank 0 does after the barrier
    assert files(out) == files(built)


# ------------------------------------------------------------------------------------ text-only caches
def test_text_only_cache_from_a_prompt_file(wan, wan_dir, tmp_path, capsys):
    prompts = ["a cat runs", "a dog runs in the park", "", "blurry"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    rc, stdout, err = cli(capsys, "cache", "--model", wan_dir, "--prompts", tmp_path / "p.txt", "--out",
                          tmp_path / "text", "--device", "cpu")
    assert rc == 0, err
    assert "3 captions in 1 shards, 0 skipped" in stdout
    cache = LatentCache(tmp_path / "text")
    assert cache.text_only and cache.manifest.settings.frames is None and len(cache) == 3
    items = cache.samples([0, 1, 2])
    assert "latents" not in items and items["captions"] == [p for p in prompts if p]
    with torch.no_grad():
        cond = wan.encode_prompts(items["captions"])
    assert torch.equal(items["context"], cond.context.to(BF16)) and torch.equal(items["mask"], cond.mask)
    batch = LatentCacheData(path=str(tmp_path / "text")).build(wan, seed=0).batch([0, 4], torch.device("cpu"))
    assert "is text-only: Batch.latents are zeros" in capsys.readouterr().err
    assert torch.equal(batch.latents, torch.zeros(wan.latent_shape(2)))  # shape only: data-free objectives
    assert batch.prompts == [prompts[0], prompts[1]]


# ------------------------------------------------------------------------------------ the data source
def test_source_serves_the_stored_samples_without_the_encoders(built, wan, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the latent cache source ran an encoder")

    for name in ("encode", "encode_prompts", "null_condition"):
        monkeypatch.setattr(wan, name, boom)
    assert parse_data_config({"kind": "latent_cache", "path": str(built)}) == LatentCacheData(path=str(built))
    source = LatentCacheData(path=str(built)).build(wan, seed=0)
    assert isinstance(source, LatentCacheSource)
    stored = LatentCache(built).samples([0, 1, 2])
    batch = source.batch([4, 0, 2], torch.device("cpu"))  # positions p → samples p mod 3
    assert batch.latents.dtype == torch.float32 and batch.sample_ids.tolist() == [4, 0, 2]
    assert torch.equal(batch.latents, stored["latents"][[1, 0, 2]].float())
    assert torch.equal(batch.cond.context, stored["context"][[1, 0, 2]].float())
    assert torch.equal(batch.cond.mask, stored["mask"][[1, 0, 2]])
    assert batch.prompts == [stored["captions"][i] for i in (1, 0, 2)]
    cache = LatentCache(built)
    assert torch.equal(batch.uncond.context, cache.null_context.float().expand(3, -1, -1))
    shuffled = LatentCacheData(path=str(built), shuffle=True).build(wan, seed=0)
    epochs = [sorted(shuffled.sample_index(p) for p in range(e * 3, e * 3 + 3)) for e in range(4)]
    assert epochs == [[0, 1, 2]] * 4  # every epoch visits every sample once


def test_source_refuses_another_model_or_an_incomplete_cache(built, wan, other_wan_dir, tmp_path):
    other = load_model(other_wan_dir)
    with pytest.raises(UserError, match=rf"^latent cache {built} was built with another model \("):
        LatentCacheData(path=str(built)).build(other, seed=0)
    wide = copy.deepcopy(wan)
    wide.set_geometry(width=64)
    with pytest.raises(UserError, match=r"holds latents of shape \(4, 3, 4, 4\) \(9×32×32 clips\); the model's are "
                                        r"\(4, 3, 4, 8\) \(9×32×64 clips\)$"):
        LatentCacheData(path=str(built)).build(wide, seed=0)
    partial = tmp_path / "partial"
    shutil.copytree(built, partial)
    (partial / "shard_00001.json").unlink()
    merge_cache(partial)
    with pytest.raises(UserError, match=r"is incomplete \(2 of 3 shards\); rerun `fewstep cache`"):
        LatentCacheData(path=str(partial)).build(wan, seed=0)


def test_finetune_recipe_trains_on_the_cache(built, wan_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run",
                     *sets(wan_dir, "data.kind=latent_cache", f"data.path={built}", "train.batch_size=2"))
    assert rc == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/student" in r] == [1, 2, 3, 4]


def test_a_conditions_extra_tensors_are_cached_and_served(tmp_path, capsys):
    """HunyuanVideo conditions on a pooled CLIP projection beside the Llama tokens: the cache keeps it
    (and the null caption's), the source hands it back in ``Conditioning.extra``."""
    from helpers import make_tiny_hunyuan_pipeline

    model_dir = make_tiny_hunyuan_pipeline(tmp_path / "hunyuan")
    model = load_model(model_dir)
    prompts = ["a cat runs in the park", "a dog runs"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    rc, _, err = cli(capsys, "cache", "--model", model_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "c")
    assert rc == 0, err
    source = LatentCacheData(path=str(tmp_path / "c")).build(model, seed=0)
    batch = source.batch([0, 1], torch.device("cpu"))
    with torch.no_grad():
        want, null = model.encode_prompts(prompts), model.null_condition(2)
    assert want.extra and set(batch.cond.extra) == set(want.extra) == set(batch.uncond.extra)
    for got, ref in ((batch.cond, want), (batch.uncond, null)):
        for name, value in ref.extra.items():
            torch.testing.assert_close(got.extra[name], value.to(torch.bfloat16).float())
        torch.testing.assert_close(got.context, ref.context.to(torch.bfloat16).float())


def test_ctrl_c_keeps_the_finished_shards_and_says_how_to_continue(wan_dir, videos, tmp_path, capsys, monkeypatch):
    import fewstep.cache as cache_command

    real = cache_command.make_shard
    calls = []

    def make_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_command, "make_shard", make_shard)
    argv = ["cache", "--model", wan_dir, "--videos", videos, "--out", tmp_path / "c", "--shard-size", "1"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 130 and err.count("\n") == 1 and "finished shards" in err and "rerun the same command" in err, err
    assert (tmp_path / "c" / "shard_00000.json").is_file()
    monkeypatch.setattr(cache_command, "make_shard", real)
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err


def test_caching_never_loads_the_transformer(wan_dir, videos, tmp_path, capsys, monkeypatch):
    """Only the VAE and the text encoder are loaded: a 14B teacher's transformer stays on disk."""
    from fewstep.models.diffusers_family import DiffusersVideoModel

    loaded, real = [], DiffusersVideoModel.component

    def component(self, name):
        if name in self.lazy:
            loaded.append(name)
        return real(self, name)

    monkeypatch.setattr(DiffusersVideoModel, "component", component)
    rc, _, err = cli(capsys, "cache", "--model", wan_dir, "--videos", videos, "--out", tmp_path / "c")
    assert rc == 0, err
    assert "transformer" not in loaded and {"vae", "text_encoder"} <= set(loaded), loaded
