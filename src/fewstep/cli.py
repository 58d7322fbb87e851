"""The ``fewstep`` command line (typer).

Every command runs inside :func:`main`, the one place that turns a
:class:`~fewstep.errors.UserError` into a single ``error: …`` line on stderr and exit code 2
(no traceback). Commands validate their input at the boundary and raise ``UserError``.
"""

from __future__ import annotations

import sys

import typer

from . import __version__
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
