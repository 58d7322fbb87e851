"""Engine overhead on the default-size toy DiT: training-step time / model forward+backward time.

    python benchmarks/engine_overhead.py [--batch 8] [--steps 10] [--repeats 5] [--threads N] [--device cpu]

The training step is :meth:`fewstep.engine.trainer.Trainer.train_step` of the ``finetune``
recipe (AdamW, grad clipping, EMA, LR warm-up, per-sample seeded noise, loss bookkeeping). The
reference is the bare ``denoiser(x_t, t, cond)`` forward + MSE + backward on the same inputs, the
only model work a flow-matching step does. Three step times are measured:

* ``data excluded``  ``train_step(batch)`` on pre-rendered batches (the engine alone);
* ``data, synchronous``  ``train_step()`` reading the toy-world source (``train.prefetch=false``: the
  step waits for its rendering + codec encoding + captions, as before the prefetcher existed);
* ``data, prefetched``  ``train_step()`` with the engine's prefetcher (``train.prefetch=true``): the next
  batch is prepared on the data thread (one intra-op thread) while the step trains.

``train.prefetch: auto`` (the default) prefetches on a CPU only when the step's threads leave a core
free: on 2 cores, run with ``--threads 1`` to see the overlap (engine/data.py).

Each is timed as blocks of ``--steps`` consecutive steps (the mean step of a block; a prefetching
block starts with nothing prepared, so its first step waits for its data), blocks of the four
kinds interleaved ``--repeats`` times so that background load affects them alike; the median
block is reported. Target: overhead <= 1.15 with data preparation counted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fewstep.data.toyworld import VOCAB
from fewstep.engine.distributed import DistEnv
from fewstep.engine.trainer import Trainer
from fewstep.models.pipeline import ToyPipelineConfig, VideoPipeline
from fewstep.models.text_encoder import ToyTextEncoderConfig
from fewstep.recipes.base import recipe_class

Finetune = recipe_class("finetune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks of each kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the training "
                        "thread (default: torch's); the data thread always uses one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        pipe = VideoPipeline(ToyPipelineConfig(text_encoder=ToyTextEncoderConfig(vocab=VOCAB)))  # default toy DiT
        pipe.save(Path(tmp) / "model")
        cfg = Finetune.load_config(None, [f"model={Path(tmp) / 'model'}", f"train.batch_size={args.batch}",
                                          "train.tensorboard=false", f"train.device={args.device}",
                                          "train.steps=1000000"])
        torch.set_flush_denormal(cfg.train.flush_denormal)  # as engine.trainer.train does
        trainer = Trainer(Finetune(cfg), Path(tmp) / "run", DistEnv(device=device))
        trainer.flush_denormal = cfg.train.flush_denormal
        denoiser = trainer.roles["student"].module
        n_params = sum(p.numel() for p in denoiser.parameters())
        batches = [trainer.source.batch(range(i * args.batch, (i + 1) * args.batch), device)
                   for i in range(args.steps)]

        def sync() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        def fwd_bwd(batch) -> None:
            g = torch.Generator().manual_seed(0)
            x0 = batch.latents
            t = torch.rand(len(batch), generator=g).to(device)
            eps = torch.randn(x0.shape, generator=g).to(device)
            alpha, sigma = denoiser.schedule.coefficients(t, x0)
            x_t, target = alpha * x0 + sigma * eps, eps - x0
            loss = (denoiser(x_t, t, batch.cond) - target).pow(2).mean()
            loss.backward()
            denoiser.zero_grad(set_to_none=True)

        def block(kind: str) -> float:
            """Mean seconds per step over one block of ``--steps`` steps."""
            trainer.close()  # no batch prepared ahead from an earlier block
            trainer.cfg.train.prefetch = kind == "prefetched"
            start = sync()
            for batch in batches:
                if kind == "model":
                    fwd_bwd(batch)
                elif kind == "excluded":
                    trainer.train_step(batch)
                else:
                    trainer.train_step()
            return (sync() - start) / len(batches)

        kinds = ("model", "excluded", "synchronous", "prefetched")
        for kind in kinds:  # warm-up
            block(kind)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                times[kind].append(block(kind))
        trainer.close()

    med = {kind: statistics.median(v) for kind, v in times.items()}
    model_t = med["model"]
    print(f"toy DiT: {n_params / 1e6:.2f} M parameters, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{device}")
    print(f"model forward+backward: {model_t * 1e3:.1f} ms")
    for kind, label in (("excluded", "data excluded"), ("synchronous", "data, synchronous"),
                        ("prefetched", "data, prefetched")):
        print(f"training step ({label}): {med[kind] * 1e3:.1f} ms   overhead = step / (forward+backward) = "
              f"{med[kind] / model_t:.3f}")
    print("target: overhead <= 1.15 with data preparation counted (data, prefetched)")


if __name__ == "__main__":
    main()
