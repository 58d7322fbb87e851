"""Teacher trajectory stores (AccVideo §4.1 SynVid): the solver grid, ``fewstep synth`` (round trip,
resume after an interruption, idempotence, refused reruns, corrupt shards) and the data source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep.data.trajectories as traj_module
import fewstep.synth as synth_module
from fewstep.data.toyworld import ToyWorld
from fewstep.data.trajectories import KEY_TIMES, TrajectoryStore, key_indices, solver_grid
from fewstep.recipes.sources import TrajectorySource
from fewstep.synth import sample_noise, synthesize
from fewstep.diffusion.samplers import sample_euler
from fewstep.diffusion.schedules import TIME_GRIDS
from fewstep.errors import UserError
from fewstep.models.pipeline import VideoPipeline
from helpers import cli, make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny store: 10 samples in shards of 4 (4 + 4 + 2), batches of 3 (not aligned with the shards).
TINY = dict(num=10, steps=10, batch_size=3, shard_size=4)


def tiny_synth(teacher, out, **kwargs):
    return synthesize(teacher, out, **{**TINY, **kwargs})


def shard_tensors(store_dir: Path) -> dict[str, dict]:
    return {p.name: load_file(p) for p in sorted(Path(store_dir).glob("shard_*.safetensors"))}


@pytest.fixture(scope="module")
def reference_store(teacher_dir, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    threads = torch.get_num_threads()  # a module fixture runs before the function-scoped one_thread
    torch.set_num_threads(1)
    try:
        return tiny_synth(teacher_dir, tmp_path_factory.mktemp("synth") / "store").directory
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the solver grid
@pytest.mark.parametrize("steps", [5, 6, 10, 50, 137])
def test_solver_grid_contains_the_key_times(steps):
    grid = solver_grid(steps)
    assert len(grid) == steps + 1 and bool((grid[1:] < grid[:-1]).all())
    index = key_indices(grid)  # asserts every key time is a grid point, exactly
    assert grid[index].tolist() == list(KEY_TIMES) and index[0] == 0 and index[-1] == steps
    counts = torch.tensor(index).diff()  # steps per key segment
    lengths = -torch.tensor(KEY_TIMES, dtype=torch.float64).diff()
    share = steps * lengths / lengths.sum()
    if bool((share >= 1).all()):  # proportional to the lengths (largest remainder)
        assert bool(((counts - share).abs() < 1).all())
    else:  # too few steps for that: one step per segment at least
        assert bool((counts >= 1).all())
    for j in range(len(counts)):  # uniform within each segment
        seg = grid[index[j]:index[j + 1] + 1].diff()
        torch.testing.assert_close(seg, seg[:1].expand_as(seg))


def test_key_times_are_the_named_grid():
    assert KEY_TIMES == tuple(TIME_GRIDS["accvideo_keys"])  # the store format's copy of AccVideo §4.2


def test_solver_grid_of_fifty_steps():
    assert torch.tensor(key_indices(solver_grid(50))).diff().tolist() == [2, 3, 4, 9, 32]
    with pytest.raises(UserError, match="at least 5 steps"):
        solver_grid(4)


# ------------------------------------------------------------------------------------ the store
def test_store_round_trip(reference_store, teacher_dir):
    store = TrajectoryStore(reference_store)
    s = store.settings
    assert store.complete and len(store) == 10 and [x.count for x in store.manifest.shards] == [4, 4, 2]
    assert s.times == list(KEY_TIMES) and s.grid == solver_grid(10).tolist() and s.cfg_scale is None
    assert json.loads((reference_store / "manifest.json").read_text())["settings"]["num"] == 10

    items = store.samples([7, 0, 9])
    assert items["latents"].shape == (3, 6, 4, 4, 4, 4) and items["context"].shape == (3, 12, 16)
    world = ToyWorld("train", length=2**62)
    assert items["prompts"] == [world.prompt_and_seed(i)[0] for i in (7, 0, 9)]  # prompt i is toy prompt i
    # the stored noise (the latent at t = 1) is seeded by (seed, i) alone
    torch.testing.assert_close(items["latents"][:, 0], sample_noise((4, 4, 4, 4), 0, [7, 0, 9]), rtol=0, atol=0)
    # an independent solve of sample 7: the teacher's Euler path on the solver grid, read at the key times
    pipe = VideoPipeline.load(teacher_dir)
    cond = pipe.encode_prompts(items["prompts"][:1])
    torch.testing.assert_close(items["context"][:1], cond.context)
    path = sample_euler(pipe.denoiser, items["latents"][:1, 0], solver_grid(10), cond, return_trajectory=True)
    expected = torch.stack(path.trajectory, 1)[:, key_indices(solver_grid(10))]
    torch.testing.assert_close(items["latents"][:1], expected, rtol=1e-5, atol=1e-5)


def test_keep_all_stores_the_whole_path(reference_store, teacher_dir, tmp_path):
    store = tiny_synth(teacher_dir, tmp_path / "all", keep="all", num=4)
    assert store.settings.times == solver_grid(10).tolist()
    full, keys = store.samples(range(4))["latents"], TrajectoryStore(reference_store).samples(range(4))["latents"]
    assert full.shape[1] == 11
    torch.testing.assert_close(full[:, key_indices(solver_grid(10))], keys, rtol=0, atol=0)


def test_cfg_and_prompt_file(teacher_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n\n  a blue square stays still  \n")
    store = tiny_synth(teacher_dir, tmp_path / "file", prompts=str(prompts), num=5, cfg_scale=3.0)
    assert store.samples(range(5))["prompts"] == ["a red circle moves left", "a blue square stays still"] * 2 + [
        "a red circle moves left"]  # line i mod P of the non-empty lines
    assert store.settings.cfg_scale == 3.0 and store.settings.prompts_sha256 is not None
    # CFG changes the path; the noise is the same
    plain = tiny_synth(teacher_dir, tmp_path / "plain", prompts=str(prompts), num=5)
    a, b = store.samples(range(5))["latents"], plain.samples(range(5))["latents"]
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)
    assert not torch.allclose(a[:, -1], b[:, -1])


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("where", ["writing a shard", "before the manifest lists it"])
def test_interrupted_synth_resumes_without_duplicates_or_gaps(reference_store, teacher_dir, tmp_path, monkeypatch,
                                                              where):
    out = tmp_path / "store"
    calls = {"n": 0}
    if where == "writing a shard":  # the second shard dies halfway through its temporary file
        real = traj_module.save_file

        def crash(tensors, path, metadata=None):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(path).write_bytes(b"half a shard")
                raise KeyboardInterrupt
            real(tensors, path, metadata=metadata)

        monkeypatch.setattr(traj_module, "save_file", crash)
    else:  # the second shard is renamed into place, but the manifest update never happens
        real = TrajectoryStore.save_manifest

        def crash(self):
            calls["n"] += 1
            if calls["n"] == 4:  # 1: the empty store, 2: its text table, 3: shard 0, 4: shard 1
                raise KeyboardInterrupt
            real(self)

        monkeypatch.setattr(TrajectoryStore, "save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_synth(teacher_dir, out)
    monkeypatch.undo()
    assert len(TrajectoryStore(out)) == 4  # only shard 0 is listed

    store = tiny_synth(teacher_dir, out)  # the same command again
    assert store.complete and not list(out.glob(".*"))  # no temporary file left
    indices = torch.cat([t["index"] for t in shard_tensors(out).values()])
    assert indices.tolist() == list(range(10))  # every sample once, in order
    reference = shard_tensors(reference_store)
    resumed = shard_tensors(out)
    assert sorted(resumed) == sorted(reference)
    for name, tensors in reference.items():
        for key, value in tensors.items():
            assert torch.equal(resumed[name][key], value), (name, key)


def test_complete_store_is_idempotent(reference_store, teacher_dir, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(synth_module, "sample_euler", lambda *a, **k: pytest.fail("a complete store was re-solved"))
    rc, stdout, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 10, "--steps", 10, "--batch-size", 3,
                          "--shard-size", 4, "--out", out)
    assert rc == 0, err
    assert "10 trajectories (3 shards" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_rerun_with_other_settings_is_refused(reference_store, teacher_dir, capsys):
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 10, "--steps", 20, "--batch-size", 3,
                     "--shard-size", 4, "--out", reference_store)
    assert rc == 2 and err.count("\n") == 1, err
    assert "made with steps=10 (this run: 20)" in err


def test_corrupt_shard_is_reported_by_name(reference_store, teacher_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 10, "--steps", 10, "--batch-size", 3,
                     "--shard-size", 4, "--out", out)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "shard_00001.safetensors is truncated or corrupt" in err

    # deleting it (as the message says) and rerunning regenerates it
    shard.unlink()
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 10, "--steps", 10, "--batch-size", 3,
                     "--shard-size", 4, "--out", out)
    assert rc == 0, err
    assert torch.equal(load_file(shard)["latents"], load_file(reference_store / shard.name)["latents"])

    # same size, different bytes: caught by the checksum when the shard is read
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard_00001.safetensors does not match its checksum"):
        TrajectoryStore(out).samples([5])


@pytest.mark.parametrize("argv,message", [
    (["--num", "0"], "--num 0 is invalid"),
    (["--keep", "some"], "--keep must be 'keys' or 'all'"),
    (["--steps", "3"], "--steps 3: the solver needs at least 5 steps"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    (["--prompts", "."], "--prompts .: a directory that is not a latent cache"),
])
def test_bad_synth_input_is_one_line_exit_2(teacher_dir, tmp_path, capsys, argv, message):
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--out", tmp_path / "store", *argv)
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_bad_prompt_word_names_the_file(teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na purple circle moves left\n")
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--prompts", prompts, "--out",
                     tmp_path / "store")
    assert rc == 2 and f"--prompts {prompts}: unknown word 'purple'" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------ the data source
def test_trajectory_source_serves_positions_mod_n(reference_store):
    pipe = make_tiny_pipeline()
    source = TrajectorySource(reference_store, pipe)
    batch = source.batch([8, 9, 10, 23], torch.device("cpu"))
    items = TrajectoryStore(reference_store).samples([8, 9, 0, 3])
    assert batch.sample_ids.tolist() == [8, 9, 10, 23] and batch.prompts == items["prompts"]
    torch.testing.assert_close(batch.extra["trajectory"], items["latents"], rtol=0, atol=0)
    torch.testing.assert_close(batch.latents, items["latents"][:, -1], rtol=0, atol=0)  # the t = 0 latent
    assert batch.extra["key_times"].shape == (4, 6) and batch.extra["key_times"][2].tolist() == list(KEY_TIMES)
    torch.testing.assert_close(batch.cond.context, items["context"], rtol=0, atol=0)
    assert torch.equal(batch.cond.mask, items["mask"])
    torch.testing.assert_close(batch.uncond.context, pipe.null_condition(4).context)
    micro = batch.slice(1, 3)  # the engine's micro-batches slice the extras too
    assert micro.extra["trajectory"].shape[0] == 2 and micro.sample_ids.tolist() == [9, 10]


def test_trajectory_source_refuses_mismatched_or_incomplete_stores(reference_store, teacher_dir, tmp_path):
    import copy

    other = make_tiny_pipeline()
    other.config = copy.deepcopy(other.config).model_copy(update={"frames": 16})  # latents (4, 8, 4, 4)
    with pytest.raises(UserError, match=r"holds latents of shape \(4, 4, 4, 4\); the model's are \(4, 8, 4, 4\)"):
        TrajectorySource(reference_store, other)
    partial = tiny_synth(teacher_dir, tmp_path / "partial", num=4)
    partial.manifest.settings.num = 10  # as if interrupted after the first shard
    partial.save_manifest()
    with pytest.raises(UserError, match=r"is incomplete \(4 of 10 samples\)"):
        TrajectorySource(tmp_path / "partial", make_tiny_pipeline())
    with pytest.raises(UserError, match="no manifest.json"):
        TrajectoryStore(tmp_path)


def test_failed_synth_leaves_no_store_and_the_corrected_rerun_works(teacher_dir, tmp_path, capsys, monkeypatch):
    """A bad prompt is found before anything is written; a store with no sample is not a store."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "store"
    prompts.write_text("a red circle moves left\na purple circle moves left\n")
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--steps", 5, "--prompts", prompts,
                     "--out", out)
    assert rc == 2 and "purple" in err and not out.exists()
    # a run that died before its first shard leaves a manifest without samples ...
    with monkeypatch.context() as m:
        m.setattr(synth_module, "sample_euler", lambda *a, **k: (_ for _ in ()).throw(UserError("died")))
        rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--steps", 5, "--out", out)
    assert rc == 2 and (out / "manifest.json").is_file()
    # ... which does not refuse a rerun with other settings
    prompts.write_text("a red circle moves left\na blue circle moves left\n")
    rc, stdout, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--steps", 5, "--prompts", prompts,
                          "--out", out)
    assert rc == 0 and "2 trajectories" in stdout, err


def test_synth_overwrite_replaces_only_the_store(reference_store, teacher_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    (out / "README.txt").write_text("mine")
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 3, "--steps", 5, "--out", out)
    assert rc == 2 and "made with num=10" in err
    rc, stdout, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 3, "--steps", 5, "--out", out,
                          "--overwrite")
    assert rc == 0 and "3 trajectories (1 shards" in stdout, err
    assert (out / "README.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.safetensors"]


def test_a_directory_that_is_not_a_store_is_refused_before_the_teacher_loads(teacher_dir, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(synth_module, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    rc, _, err = cli(capsys, "synth", "--teacher", teacher_dir, "--num", 2, "--steps", 5, "--out", out)
    assert rc == 2 and "is not a trajectory store" in err and err.count("\n") == 1, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
