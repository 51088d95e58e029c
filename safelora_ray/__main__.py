"""``python -m safelora_ray``: the ``safelora-ray`` command."""

import sys

from safelora_ray.cli import main

sys.exit(main())
