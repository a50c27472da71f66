"""``medrecon tune``: solver settings per operator (arrives with the diffusion solvers)."""

from __future__ import annotations

import argparse

from medrecon.errors import SettingsError


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="tune solver settings for a prior and an operator (diffusion solvers)",
                       description="Tune the diffusion solvers' settings (step size, λ, steps) on "
                       "validation data.")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    try:
        from medrecon.solvers import tuning  # noqa: F401
    except ImportError:
        raise SettingsError(
            "tune: tuning arrives with the diffusion solvers (medrecon.solvers.tuning is not installed yet)"
        ) from None
    raise SettingsError("tune: medrecon.solvers.tuning exists but has no command-line entry yet")
