"""Ray Job entrypoint: build an alignment set. Takes the flags of ``safelora-ray build``.

    ray job submit --working-dir . --submission-id build-llama2-7b-qv-20261123 -- \
        python jobs/build_alignment.py --base hf://meta-llama/Llama-2-7b-hf \
        --aligned hf://meta-llama/Llama-2-7b-chat-hf --targets q_proj,v_proj \
        --out s3://bucket/alignment/llama2-7b-qv
"""

from __future__ import annotations

import sys

from _bootstrap import ensure_importable

ensure_importable()

from safelora_ray.cli.main import run  # noqa: E402

if __name__ == "__main__":
    run(["build", *sys.argv[1:]])
