"""The ``fewstep`` command line (typer).

Every command runs inside :func:`main`, the one place that turns a
:class:`~fewstep.errors.UserError` into a single ``error: …`` line on stderr and exit code 2
(no traceback). Commands validate their input at the boundary and raise ``UserError``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from . import __version__
from .config import dump_config
from .errors import UserError

app = typer.Typer(
    name="fewstep",
    help="Distil many-step video diffusion / flow-matching teachers into 1–4 step students.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"fewstep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """fewstep: RGTD, DOLLAR, AccVideo and SwiftVideo as composable objectives in one engine."""


@app.command()
def timesteps(
    schedule: str = typer.Option("flow", help="Noise schedule: 'flow' (flow matching) or 'vp' (DDPM)."),
    steps: int = typer.Option(None, help="Sampler steps (the grid an N-step Euler/DDIM sampler visits)."),
    grid: str = typer.Option(None, help="A named grid instead of --steps (e.g. dollar4, ddim50, accvideo_keys)."),
    shift: float = typer.Option(1.0, help="Flow-matching shift s."),
    betas: str = typer.Option("scaled_linear", help="VP betas: linear or scaled_linear."),
    zero_terminal_snr: bool = typer.Option(False, help="VP: rescale betas to zero terminal SNR."),
):
    """Print a timestep grid: continuous t, alpha(t), sigma(t) and the backbone's model timestep."""
    from rich.console import Console
    from rich.table import Table

    from .config import FlowMatchingConfig, VPConfig, parse_config
    from .diffusion.schedules import named_grid, sampling_grid

    if schedule == "flow":
        sched = parse_config(FlowMatchingConfig, {"shift": shift}).build()
    elif schedule == "vp":
        sched = parse_config(VPConfig, {"betas": betas, "zero_terminal_snr": zero_terminal_snr}).build()
    else:
        raise UserError(f"--schedule must be 'flow' or 'vp', got {schedule!r}")
    if (steps is None) == (grid is None):
        raise UserError("give exactly one of --steps N or --grid NAME")
    t = named_grid(grid, sched) if grid else sampling_grid(sched, steps)
    table = Table(title=f"{schedule} schedule: {grid or f'{steps}-step sampling grid'}")
    for col in ("i", "t", "alpha", "sigma", "model timestep"):
        table.add_column(col, justify="right")
    for i, ti in enumerate(t.tolist()):
        tt = t.new_tensor(ti)
        table.add_row(str(i), f"{ti:.4f}", f"{float(sched.alpha(tt)):.4f}", f"{float(sched.sigma(tt)):.4f}",
                      f"{float(sched.model_timestep(tt)):.2f}")
    Console().print(table)


@app.command()
def pretrain(
    stage: str = typer.Option("all", help="codec | latents | teacher | export | all (in that order)."),
    work: Path = typer.Option(Path("runs/pretrain"), help="Work directory for checkpoints and caches."),
    out: Path = typer.Option(None, help="Where to export the teacher (default: the package's shipped toy-teacher)."),
    config: Path = typer.Option(None, help="YAML file overriding pretraining defaults."),
    set_: list[str] = typer.Option([], "--set", help="Dotted override, e.g. teacher.steps=2000 (repeatable)."),
    max_minutes: float = typer.Option(1e9, help="Stop (after a checkpoint) once this many minutes have passed."),
):
    """Train the embedded default from scratch: codec, latent cache, toy teacher; resumable in chunks."""
    from .config import load_config
    from .models.pipeline import SHIPPED
    from .pretrain import PretrainConfig, build_latents, export_teacher, train_codec, train_teacher
    from .utils.progress import StageProgress

    stages = ["codec", "latents", "teacher", "export"]
    if stage != "all" and stage not in stages:
        raise UserError(f"--stage must be one of all, {', '.join(stages)}; got {stage!r}")
    cfg = load_config(PretrainConfig, config, set_)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(dump_config(cfg))
    budget = max_minutes * 60
    start = time.monotonic()
    with StageProgress() as progress:
        for name in stages if stage == "all" else [stage]:
            left = budget - (time.monotonic() - start)
            if name == "codec" and not train_codec(cfg, work, left, progress):
                break
            if name == "latents":
                build_latents(cfg, work, progress)
            if name == "teacher" and not train_teacher(cfg, work, left, progress):
                break
            if name == "export":
                target = export_teacher(cfg, work, out or SHIPPED["toy-teacher"])
                typer.echo(f"teacher written to {target}")
        else:
            return
    typer.echo(f"time budget reached; run the same command again to continue from {work}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, mapping user errors to one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return UserError.exit_code
    except SystemExit as exc:  # typer/click exit codes (0, or 2 for usage errors)
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def _console_main():  # pragma: no cover - thin wrapper for the console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _console_main()
