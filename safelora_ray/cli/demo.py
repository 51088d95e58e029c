"""``safelora-ray demo``: the whole pipeline on a small synthetic model, on a local Ray.

Writes a Llama-shaped base/aligned pair (sharded safetensors + index) and a catalog of tenant
adapters in the PEFT format, builds the alignment set, sanitizes the catalog, and prints where
everything is. One adapter is a DoRA adapter, which Safe LoRA does not cover: it shows how a
refused adapter is reported while the rest of the fleet completes. The files are written with
:mod:`safelora_ray.formats.synthetic` (whose ``write_model``, ``write_adapter`` and
``BASE_MODEL_ID`` are also importable from here, as the tests do).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safelora_ray.formats.synthetic import (
    BASE_MODEL_ID,
    Arch,
    random_weights,
    write_adapter,
    write_model,
)
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs

logger = logging.getLogger(__name__)

#: The synthetic model: a small Llama with GQA.
DEMO_ARCH = Arch(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=1000)


def _weights(arch: Arch, g: torch.Generator) -> dict[str, torch.Tensor]:
    # The demo draws lm_head right after the embeddings (its inputs stay what they were).
    shapes = arch.shapes()
    order = [shapes[0], shapes[-1], *shapes[1:-1]]
    return random_weights(order, g, scale=0.02, dtype=torch.bfloat16)


def write_demo_inputs(root: Path, seed: int = 0, tenants: int = 3,
                      per_tenant: int = 4) -> dict[str, str]:
    """Write the pair and the catalog under ``root``; returns their locations."""
    g = torch.Generator().manual_seed(seed)
    arch = DEMO_ARCH
    base = _weights(arch, g)
    aligned = {}
    for name, w in base.items():
        if w.dim() == 2:
            d_out, d_in = w.shape
            upd = torch.randn(d_out, 8, generator=g) @ torch.randn(8, d_in, generator=g) * 2e-3
            aligned[name] = (w.float() + upd).to(w.dtype)
        else:
            aligned[name] = w.clone()
    write_model(root / "models" / "base", base)
    write_model(root / "models" / "aligned", aligned)

    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(arch.layers)
               for p in ("q_proj", "v_proj")]
    catalog = root / "catalog"
    for t in range(tenants):
        for k in range(per_tenant):
            r = 8 if k % 2 == 0 else 16
            lora = {}
            for j, m in enumerate(modules):
                w = base[m + ".weight"]
                v = (aligned[m + ".weight"].float() - w.float())
                a = torch.randn(r, w.shape[1], generator=g) * 0.01
                b = torch.randn(w.shape[0], r, generator=g) * 0.01
                # Most updates keep close to the alignment direction (as fine-tunes of a chat
                # model mostly do); every 8th drifts away and is what Safe LoRA projects.
                if (j + 3 * k + 5 * t) % 8:
                    b = b + v @ torch.randn(v.shape[1], r, generator=g) * 0.5
                lora[m] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
            write_adapter(catalog / f"tenant-{t}" / f"adapter-{k:02d}", lora, r)
    # A DoRA adapter: outside Safe LoRA's rule, refused with a clear message.
    a, b = (torch.randn(8, arch.hidden, generator=g).bfloat16(),
            torch.randn(arch.hidden, 8, generator=g).bfloat16())
    write_adapter(catalog / "tenant-0" / "dora-adapter", {modules[0]: (a, b)}, 8, use_dora=True)
    return {"base": str(root / "models" / "base"), "aligned": str(root / "models" / "aligned"),
            "catalog": str(catalog)}


def run_demo(root: str, threshold: float = 0.35, workers: int | None = None,
             progress: bool = True, say: Callable[[str], None] = print
             ) -> tuple[int, dict[str, Any]]:
    """Write the inputs, build, sanitize; tell ``say`` where everything is.

    Returns:
        The exit code, and what ``demo --json`` prints.
    """
    from safelora_ray.execution import worker_session
    from safelora_ray.execution.ray_utils import ensure_ray
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.build.config import BuildConfig
    from safelora_ray.pipelines.build.driver import build
    from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
    from safelora_ray.reports import text_summary

    check_outputs([Output("--dir", root)], [])  # a file there, or a read-only place: say so
    probe_outputs([Output("--dir", root)])
    rootp = Path(root).resolve()
    rootp.mkdir(parents=True, exist_ok=True)
    if (rootp / "catalog").exists():  # inputs are kept: a rerun shows the incremental path
        say(f"[1/3] reusing the synthetic inputs under {rootp}")
        paths = {"base": str(rootp / "models" / "base"),
                 "aligned": str(rootp / "models" / "aligned"), "catalog": str(rootp / "catalog")}
    else:
        say(f"[1/3] writing a synthetic base/aligned pair and a tenant catalog under {rootp}")
        paths = write_demo_inputs(rootp)
    aset_uri = str(rootp / "alignment" / "llama-mini-qv")
    where = "in this process" if workers == 0 else "on a local Ray"
    if workers != 0:
        ensure_ray()  # the demo shows the Ray path, small as its inputs are
    # One set of worker actors for both steps (a worker process imports torch once).
    with worker_session():
        say(f"[2/3] building the alignment set (q_proj, v_proj) {where}")
        res = build(BuildConfig(base=paths["base"], aligned=paths["aligned"], out=aset_uri,
                                workers=workers, progress=progress))
        say(AlignmentSet.open(res.uri).summary())
        say(f"[3/3] sanitizing the catalog {paths['catalog']} (threshold {threshold})")
        result = sanitize(SanitizeConfig(alignment=aset_uri, adapters=paths["catalog"],
                                         out=str(rootp / "sanitized"), threshold=threshold,
                                         workers=workers, progress=progress))
    say(text_summary(result))
    say("")
    say(f"sanitized adapters: {rootp / 'sanitized'}/<tenant>/<adapter>/")
    report_html = os.path.join(result.report_uri, "report.html")
    say(f"report for people:  {report_html}")
    expected_failures = {"tenant-0/dora-adapter"}
    failed = {a for a, _ in result.errors}
    unexpected = sorted(failed ^ expected_failures)
    record = {"command": "demo", "inputs": paths, "alignment": res.uri,
              "alignment_id": result.alignment_id, "sanitized": str(rootp / "sanitized"),
              "run_id": result.run_id, "ok": result.ok, "skipped": result.skipped,
              "error": result.error, "report": result.report_uri, "report_html": report_html,
              "unexpected": unexpected}
    if unexpected:
        say(f"unexpected outcome for: {unexpected}")
        return 1, record
    say("the DoRA adapter was refused on purpose (Safe LoRA covers plain LoRA only); "
        "every other adapter was sanitized.")
    return 0, record


__all__ = ["BASE_MODEL_ID", "DEMO_ARCH", "run_demo", "write_adapter", "write_demo_inputs",
           "write_model"]
