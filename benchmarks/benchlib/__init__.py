"""The benchmarks' shared pieces (``benchmarks/`` is first on ``sys.path`` when a script runs,
and on the Ray workers' too): :mod:`.models` (inputs), :mod:`.runtime` (the code measured, Ray),
:mod:`.monitor` and :mod:`.workers` (memory), :mod:`.floors` and :mod:`.measure`
(figures), :mod:`.s3` (a moto server, or SeaweedFS), :mod:`.runs` (flags, timing, output)."""
