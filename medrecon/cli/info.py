"""``medrecon info``: versions, device, optional backends and shipped priors."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, device, optional backends and priors")
    p.set_defaults(run=run)


def run(_: argparse.Namespace) -> int:
    from medrecon.pipeline.environment import describe

    for line in describe():
        print(line)
    return 0
