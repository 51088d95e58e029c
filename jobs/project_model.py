"""Ray Job entrypoint: project a full fine-tune (SPEC §3). Takes the flags of
``safelora-ray project-model``.

    ray job submit --working-dir . --submission-id project-acme-support-20261123 -- \
        python jobs/project_model.py --alignment s3://bucket/alignment/llama2-7b-qv \
        --aligned hf://meta-llama/Llama-2-7b-chat-hf \
        --finetuned s3://bucket/finetunes/acme-support \
        --out s3://bucket/projected/acme-support --threshold 0.35
"""

from __future__ import annotations

import sys

from _bootstrap import ensure_importable

ensure_importable()

from safelora_ray.cli.main import run  # noqa: E402

if __name__ == "__main__":
    run(["project-model", *sys.argv[1:]])
