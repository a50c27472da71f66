"""``python -m medrecon.training`` (same as ``medrecon train``; also under ``torchrun -m``)."""

from __future__ import annotations

import contextlib
import sys

from medrecon.training.cli import main

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
