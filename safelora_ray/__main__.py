"""``python -m safelora_ray``: the ``safelora-ray`` command."""

from safelora_ray.cli import run

run()
