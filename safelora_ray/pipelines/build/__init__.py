"""The alignment-set build: a base/aligned model pair → an alignment set (SPEC §1).

:mod:`.config` says what to build, :mod:`.worker` builds one shard's files on a worker, and
:mod:`.driver` plans, dispatches the shards' files and publishes the set.
"""
