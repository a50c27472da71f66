"""Command-line entry point of the priors: ``medrecon priors list|show NAME``.

A thin shell around :mod:`medrecon.priors.registry`; ``medrecon.cli`` dispatches to
:func:`priors_main`.  It also runs as ``python -m medrecon.priors list``.  (``medrecon train``
is :func:`medrecon.training.cli.main`.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from medrecon.priors.registry import shipped_registry

__all__ = ["priors_main"]


def priors_main(argv: Sequence[str] | None = None) -> int:
    """``medrecon priors list`` / ``medrecon priors show NAME``; returns the exit status."""
    p = argparse.ArgumentParser(prog="medrecon priors", description="Shipped score priors.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="names, modality, resolution, steps")
    show = sub.add_parser("show", help="print a model card")
    show.add_argument("name")
    ns = p.parse_args(argv)
    reg = shipped_registry()
    if ns.cmd == "list":
        for name in reg.names():
            c = reg.card(name)
            res = "x".join(str(r) for r in c.get("resolution", []))
            steps = c.get("training", {}).get("steps", "?")
            print(
                f"{name:12s} {c.get('modality', '?'):4s} {res:8s} {c.get('sde', {}).get('kind', '?')}"
                f"  {c.get('architecture', {}).get('size', '?')}  steps={steps}"
            )
        return 0
    print(json.dumps(reg.card(ns.name), indent=2))
    return 0
