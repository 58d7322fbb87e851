"""Data sources and evaluators chosen by config (recipes/sources.py, recipes/evaluators.py)."""

from __future__ import annotations

import pytest
import torch
import yaml

from fewstep.data.toyworld import ToyWorld
from fewstep.errors import UserError
from fewstep.recipes.evaluators import ToyVBench, ToyVBenchConfig, parse_evaluator_config
from fewstep.recipes.base import recipe_class
from fewstep.recipes.sources import (DATA_SOURCES, ToyWorldData, ToyWorldSource, TrajectoryStoreData,
                                     parse_data_config)
from helpers import cli, make_tiny_pipeline

Finetune = recipe_class("finetune")


def test_data_config_kinds_and_shorthand():
    assert set(DATA_SOURCES) >= {"toy_world", "trajectory_store"}
    assert parse_data_config({"kind": "toy_world"}) == ToyWorldData()
    assert parse_data_config("runs/synvid") == TrajectoryStoreData(path="runs/synvid")  # a path: a store
    assert parse_data_config({"kind": "trajectory_store", "path": "x"}).path == "x"


@pytest.mark.parametrize("raw,message", [
    ({"kind": "parquet"}, "config key 'data.kind': unknown data source 'parquet'; known: toy_world, trajectory_store, "
                          "latent_cache, preference_store"),
    ({"path": "x"}, "missing config key 'data.kind' (one of toy_world, trajectory_store, latent_cache, "
                    "preference_store)"),
    ({"kind": "trajectory_store"}, "missing config key 'data.path'"),
    ({"kind": "toy_world", "seed": 3}, "unknown config key 'data.seed'; allowed keys here: kind"),
    (3, "config key 'data': expected a mapping with a 'kind'"),
])
def test_bad_data_config_is_one_line(raw, message):
    with pytest.raises(UserError) as err:
        parse_data_config(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_evaluator_config_is_one_line():
    assert parse_evaluator_config({"kind": "toy_vbench"}) == ToyVBenchConfig()
    with pytest.raises(UserError, match=r"^config key 'evaluator.kind': unknown evaluator 'vbench'; "
                                        r"known: toy_vbench, videos$"):
        parse_evaluator_config({"kind": "vbench"})


def test_recipe_config_holds_and_resolves_the_blocks(teacher_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run", "--dry-run",
                       "--set", f"model={teacher_dir}")
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["data"] == {"kind": "toy_world"} and cfg["evaluator"] == {"kind": "toy_vbench"}
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run", "--dry-run",
                     "--set", "data.kind=webdataset")
    assert rc == 2 and err.count("\n") == 1 and "config key 'data.kind': unknown data source 'webdataset'" in err
    cfg = Finetune.load_config(None, [f"model={teacher_dir}", "data=/some/store"])
    assert cfg.data == TrajectoryStoreData(path="/some/store")  # the shorthand, as accvideo's --set data=DIR


def test_toy_world_source_is_the_old_stream():
    """Toy-world clips at the model's geometry, encoded by its codec; train.seed s starts at s·2³²."""
    pipe = make_tiny_pipeline()
    source = ToyWorldData().build(pipe, seed=1)
    assert isinstance(source, ToyWorldSource)
    batch = source.batch([0, 5], torch.device("cpu"))
    world = ToyWorld("train", frames=8, size=16, length=2**62)
    items = world.batch([2**32, 2**32 + 5])
    with torch.no_grad():
        assert torch.equal(batch.latents, pipe.encode(items["frames"]))
        assert torch.equal(batch.cond.context, pipe.encode_prompts(items["prompts"]).context)
    assert batch.prompts == items["prompts"] and batch.sample_ids.tolist() == [0, 5]


def test_toy_vbench_reference_is_the_teacher_or_the_toy_world(tiny_pipeline):
    from fewstep.engine.config import TrainConfig
    from fewstep.engine.health import HealthConfig, HealthMonitor

    train, monitor = TrainConfig(eval_prompts=1, eval_samples=2), HealthMonitor(HealthConfig())
    with_teacher = ToyVBenchConfig().build(train, monitor, tiny_pipeline, tiny_pipeline)
    without = ToyVBenchConfig().build(train, monitor, tiny_pipeline, None)
    assert isinstance(with_teacher, ToyVBench) and with_teacher.suite == without.suite and len(without.suite) == 2
    prompt, seeds = without.suite[0][0], [s for _, s in without.suite]
    teacher_videos, world_videos = with_teacher.reference(prompt, seeds), without.reference(prompt, seeds)
    assert teacher_videos.shape == world_videos.shape == (2, 8, 16, 16, 3)
    assert not (teacher_videos == world_videos).all()
