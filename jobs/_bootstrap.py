"""Make ``safelora_ray`` importable when a job runs from an uploaded ``--working-dir`` copy
of the repository rather than from an image or pip install that provides it."""

from __future__ import annotations

import os
import sys


def ensure_importable() -> None:
    try:
        import safelora_ray  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
