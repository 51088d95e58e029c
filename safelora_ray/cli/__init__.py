"""The entry points: the command line, the nightly job, the demo and inspect."""

from safelora_ray.cli.main import main, run

__all__ = ["main", "run"]
