"""benchmarks/real_teacher.py at ``--size tiny``: the JSON it writes has every figure, with sane values, and
its analytic FLOP count agrees with PyTorch's counter."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "real_teacher.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_forward_flops_match_pytorch_flop_counter(bench):
    size = bench.SIZES["tiny"]
    denoiser = bench.wan_denoiser(bench.build_transformer(size.wan, torch.device("cpu"), seed=0))
    batch = bench.make_batch(1, size.latent, size, torch.device("cpu"), seed=0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser(batch.latents, torch.tensor([0.5]), batch.cond)
    fwd = bench.forward_flops(size.wan, size.latent, size.text_tokens)
    # the counter has no formula for the CPU attention kernel: everything else must agree exactly
    assert counter.get_total_flops() == sum(fwd.values()) - fwd["attention"]
    assert fwd["attention"] > 0


def test_tiny_run_writes_every_figure(bench, tmp_path):
    out = tmp_path / "real_teacher.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())

    config = result["config"]
    assert config["tokens_per_sample"] == 3 * 2 * 2 and config["latent_shape"] == [1, 16, 3, 4, 4]
    assert config["dtype"] == "float32"

    eager = result["sampling"]["eager"]
    assert eager["teacher"]["nfe"] == 100 and eager["student"]["nfe"] == 4 and eager["nfe_ratio"] == 25
    assert eager["teacher"]["seconds"] > 0 and eager["student"]["seconds"] > 0
    assert eager["speedup"] > 1
    assert "skipped" in result["sampling"]["compiled"]  # compile is off by default on a CPU

    training = result["training"]
    flops = training["flops_per_step"]
    assert 0 < flops["lora"] < flops["full"]
    assert training["peak_flops"] > 0 and "measured" in training["peak_source"]
    setups = {(s["fake_score"], s["checkpointing"]): s for s in training["setups"]}
    assert set(setups) == {(f, c) for f in ("full", "lora") for c in (False, True)}
    for s in setups.values():
        assert "error" not in s
        assert s["seconds"] > 0 and s["tokens_per_second"] > 0
        assert 0 < s["mfu"] and math.isfinite(s["mfu"])
        m = s["memory"]
        assert 0 < m["step_bytes"] <= m["peak_bytes"] and m["resident_bytes"] > 0
    for fake in ("full", "lora"):  # activation checkpointing keeps less of the step alive
        assert setups[fake, True]["memory"]["peak_bytes"] <= setups[fake, False]["memory"]["peak_bytes"]
    full, lora = setups["full", False]["fake_score_params"], setups["lora", False]["fake_score_params"]
    assert lora["trainable"] < full["trainable"]
    assert lora["own_bytes"] + lora["optimizer_bytes"] < full["own_bytes"] + full["optimizer_bytes"]
    assert setups["lora", False]["memory"]["resident_bytes"] < setups["full", False]["memory"]["resident_bytes"]
