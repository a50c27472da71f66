"""``python -m medrecon.priors list|show NAME`` (same as ``medrecon priors``)."""

from __future__ import annotations

import sys

from medrecon.errors import MedreconError
from medrecon.priors.cli import priors_main

if __name__ == "__main__":
    try:
        sys.exit(priors_main())
    except MedreconError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
