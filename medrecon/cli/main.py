"""The ``medrecon`` command: parses arguments, builds a config, calls one library function.

One module per sub-command (``add_parser(sub)`` registers it and sets ``run``); ``priors`` is
delegated to :mod:`medrecon.priors.cli`, ``train`` to :mod:`medrecon.training.cli`, ``pacs`` to
:mod:`medrecon.cli.pacs`.  Exit codes: 0 success, 2 bad input or usage (one line naming the file
and problem, no traceback), 3 a batch finished with failed cases.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from medrecon.cli import batch, check_geometry, convert, evaluate, info, reconstruct, simulate, tune
from medrecon.cli.options import WarningPrinter
from medrecon.errors import MedreconError

EXAMPLES = """examples:
  medrecon reconstruct --modality ct --views 23            # bundled CT slice, 23-view CT
  medrecon reconstruct --modality ct --input SERIES_DIR --views 60 --method tv --out results
  medrecon reconstruct --modality mri --input brain.nii.gz --acceleration 8 --mask random
  medrecon simulate ct bundled sims --views 60 --noise gaussian --sigma 0.5
  medrecon batch cases.csv --out runs/ct23 --method tv --workers 2
  medrecon evaluate runs/ct23/cases/c1/c1_tv.nii.gz --reference truth.nii.gz
  medrecon reconstruct --modality mri --input meas.dat --method cg    # Siemens twix raw data
  medrecon convert meas.dat meas.h5 --to mrd
  medrecon check-geometry scan.npy                         # detector direction, centre of rotation
  medrecon priors list
  medrecon info

exit status: 0 success, 2 bad input or usage, 3 batch finished with failed cases
"""

COMMANDS = (reconstruct, check_geometry, simulate, batch, evaluate, tune, convert, info)
DELEGATED = {"priors": "list or show the shipped score priors (medrecon priors list|show NAME)",
             "train": "train a score prior on your own data (medrecon train -h)",
             "pacs": "list, pull, push and batch-reconstruct studies in a PACS (medrecon pacs -h)"}


def build_parser() -> argparse.ArgumentParser:
    """The ``medrecon`` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="medrecon", description="Reconstruct CT and MRI images from incomplete measurements.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _delegate(command: str, rest: list[str]) -> int:
    if command == "pacs":
        from medrecon.cli.pacs import pacs_main

        return int(pacs_main(rest) or 0)
    if command == "train":
        from medrecon.training.cli import main as train_main

        return int(train_main(rest) or 0)
    from medrecon.priors.cli import priors_main

    return int(priors_main(rest) or 0)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename:
        path = Path(str(err.filename))
        if path.name.startswith(".") or path.name.endswith(".tmp"):  # a writer's temporary file
            return f"{path.parent}: cannot write into this folder ({err.strerror or err})"
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medrecon`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = WarningPrinter(command)  # one clean line per warning
            if command in DELEGATED:
                return _delegate(command, argv[1:])
            a = parser.parse_args(argv)
            if a.command is None:
                parser.print_help()
                return 2
            return int(a.run(a))
    except MedreconError as err:
        print(f"medrecon {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable output folder, disk full, ...
        print(f"medrecon {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medrecon {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
