"""The pipelines: each turns its inputs into outputs by running task functions on the
execution layer (:mod:`safelora_ray.workers`), which knows none of them.

- :mod:`~safelora_ray.pipelines.build`: a base/aligned model pair → an alignment set;
- :mod:`~safelora_ray.pipelines.sanitize`: an alignment set + a catalog of adapters →
  sanitized adapters and reports.
"""
