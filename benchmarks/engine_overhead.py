"""Engine overhead on the default-size toy DiT: training-step time / model forward+backward time.

    python benchmarks/engine_overhead.py [--batch 8] [--steps 20]

The training step is :meth:`fewstep.engine.trainer.Trainer.train_step` of the ``finetune``
recipe (AdamW, grad clipping, EMA, LR warm-up, per-sample seeded noise, loss bookkeeping) on
pre-rendered batches — data loading (toy-world rendering + codec encoding) is reported
separately, since a real run overlaps it with compute. The reference is the bare
``denoiser(x_t, t, cond)`` forward + MSE + backward on the same inputs, the only model work a
flow-matching step does. Both are timed interleaved (median of ``--steps``), so background load
affects them alike. Target: overhead <= 1.15.
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
from fewstep.recipes.finetune import Finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        pipe = VideoPipeline(ToyPipelineConfig(text_encoder=ToyTextEncoderConfig(vocab=VOCAB)))  # default toy DiT
        pipe.save(Path(tmp) / "model")
        cfg = Finetune.load_config(None, [f"model={Path(tmp) / 'model'}", f"train.batch_size={args.batch}",
                                          "train.tensorboard=false", "train.device=cpu"])
        torch.set_flush_denormal(cfg.train.flush_denormal)  # as engine.trainer.train does
        trainer = Trainer(Finetune(cfg), Path(tmp) / "run", DistEnv())
        denoiser = trainer.roles["student"].module
        n_params = sum(p.numel() for p in denoiser.parameters())

        t0 = time.perf_counter()
        batches = [trainer.source.batch(range(i * args.batch, (i + 1) * args.batch), torch.device("cpu"))
                   for i in range(args.steps + 3)]
        data_time = (time.perf_counter() - t0) / len(batches)

        def fwd_bwd(batch) -> float:
            g = torch.Generator().manual_seed(0)
            x0 = batch.latents
            t = torch.rand(len(batch), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            alpha, sigma = denoiser.schedule.coefficients(t, x0)
            x_t, target = alpha * x0 + sigma * eps, eps - x0
            start = time.perf_counter()
            loss = (denoiser(x_t, t, batch.cond) - target).pow(2).mean()
            loss.backward()
            elapsed = time.perf_counter() - start
            denoiser.zero_grad(set_to_none=True)
            return elapsed

        def step(batch) -> float:
            start = time.perf_counter()
            trainer.train_step(batch)
            return time.perf_counter() - start

        for batch in batches[:3]:  # warm-up
            step(batch), fwd_bwd(batch)
        steps, models = [], []
        for batch in batches[3:]:
            models.append(fwd_bwd(batch))
            steps.append(step(batch))

    step_t, model_t = statistics.median(steps), statistics.median(models)
    print(f"toy DiT: {n_params / 1e6:.2f} M parameters, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"model forward+backward: {model_t * 1e3:.1f} ms   training step: {step_t * 1e3:.1f} ms   "
          f"(data, excluded: {data_time * 1e3:.1f} ms/batch)")
    print(f"engine overhead = step / (forward+backward) = {step_t / model_t:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
