"""Can SwiftVideo's discriminator (papers/003 Eq. 10) tell a student's one-step x̂0 from real clips at all?

    python benchmarks/da_probe.py --student runs/l_ccd1000/student --features toy_clip --out runs/bench/da_toy_clip.json
    python benchmarks/da_probe.py --student runs/l_ccd1000/student --features denoiser --out runs/bench/da_denoiser.json

Offline, with the student frozen: the discriminator of the recipe's role builder (``feature_discriminator`` with
``--features``; its frozen feature network and fresh spatial + temporal heads) is trained alone on Eq. 10's
L^D for ``--steps`` batches of 8 toy-world clips (each batch new): the real clip x0 against the student's
``x̂0 = x_t − t·F_θ(x_t, t)`` at t ~ logit-normal(−0.6, 1.4) (the recipe's), as ``da_discriminator`` does it
(decoded frames for an image feature network, the latents for ``denoiser``). Every 50 steps it reports the mean
L^D (chance: 2 per head, the loss at D ≡ 0), the pair accuracy (the share of (clip, head) with
D(x0) > D(x̂0)) and the same at t > 0.5, where x̂0 is a sample rather than a copy of x0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fewstep.diffusion.schedules import FlowMatching
from fewstep.models.family import load_model
from fewstep.objectives.distribution_alignment import hinge_discriminator_loss_eq10
from fewstep.recipes.builders import parse_build
from fewstep.recipes.sources import ToyWorldSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="the student whose one-step x̂0 are the fakes")
    parser.add_argument("--teacher", default="toy-teacher", help="its teacher: data encoders, decoder, features")
    parser.add_argument("--features", default="toy_clip", choices=["toy_clip", "denoiser"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the 50-step windows")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    teacher, student = load_model(args.teacher), load_model(args.student).denoiser
    disc = parse_build({"kind": "feature_discriminator", "features": args.features}, "discriminator").build(teacher)
    disc.train()
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=args.lr)
    source = ToyWorldSource(teacher, args.seed)
    schedule = student.schedule
    view = (lambda x: x) if disc.space == "latent" else teacher.decode
    heads = len(disc.spatial) + len(disc.temporal)
    window, report = [], []
    for step in range(args.steps):
        batch = source.batch(list(range(step * args.batch, (step + 1) * args.batch)), torch.device("cpu"))
        with torch.no_grad():
            sigma = torch.sigmoid(torch.randn(args.batch) * 1.4 - 0.6)
            t = schedule.unshift(sigma) if isinstance(schedule, FlowMatching) else sigma
            x_t = schedule.add_noise(batch.latents, torch.randn_like(batch.latents), t)
            real, fake = view(batch.latents), view(student.predict(x_t, t, batch.cond).x0)
        d_real, d_fake = disc(real, batch.cond), disc(fake, batch.cond)  # (B, K)
        loss = hinge_discriminator_loss_eq10(d_real, d_fake).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        right = (d_real > d_fake).float()  # (B, K)
        late = sigma > 0.5
        window.append((loss.item(), right.mean().item(), right[late].mean().item() if late.any() else None))
        if (step + 1) % 50 == 0:
            late_acc = [w[2] for w in window if w[2] is not None]
            row = {"step": step + 1, "loss": sum(w[0] for w in window) / len(window), "chance": 2.0 * heads,
                   "pair_accuracy": sum(w[1] for w in window) / len(window),
                   "pair_accuracy_t_above_0.5": sum(late_acc) / max(1, len(late_acc))}
            report.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            window = []
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "windows": report},
                                       indent=1))


if __name__ == "__main__":
    main()
