"""The pipelines: each turns its inputs into outputs by running task functions on the
execution layer (:mod:`safelora_ray.execution.workers`), which knows none of them.

- :mod:`~safelora_ray.pipelines.build.driver`: a base/aligned model pair → an alignment set;
- :mod:`~safelora_ray.pipelines.sanitize.driver`: an alignment set + a catalog of adapters →
  sanitized adapters and reports.
"""
