"""Ray Job entrypoint: compute SaLoRA safety modules. Takes the flags of
``safelora-ray salora-modules``.

    ray job submit --working-dir . --submission-id salora-llama2-7b-qv-20261127 -- \
        python jobs/salora_modules.py --model hf://meta-llama/Llama-2-7b-chat-hf \
        --calibration s3://bucket/calibration/safety.jsonl --targets q_proj,v_proj \
        --safety-rank 32 --out s3://bucket/salora/llama2-7b-chat-qv \
        --export-cs s3://bucket/salora/llama2-7b-chat-qv-cs.safetensors
"""

from __future__ import annotations

import sys

from _bootstrap import ensure_importable

ensure_importable()

from safelora_ray.cli.main import run  # noqa: E402

if __name__ == "__main__":
    run(["salora-modules", *sys.argv[1:]])
