"""``python -m safelora_ray``: the ``safelora-ray`` command."""

from safelora_ray.cli.main import run

run()
