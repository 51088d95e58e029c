"""The baseline of ``bench_fleet.py`` (the official IBM/SafeLoRA approach, one process: for
every adapter, load both full models, compute the projection matrices and the dense products)
and the comparison of its outputs with ours.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

#: The modules the fleet's adapters target (and the baseline projects).
TARGETS = ("q_proj", "v_proj")

def baseline_one(base_dir: str, aligned_dir: str, adapter_dir: Path, out_dir: Path,
                 threshold: float, device: str) -> dict[str, Any]:
    """Sanitize one adapter the way the official code does, from scratch."""
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    models = []
    for d in (base_dir, aligned_dir):  # both models, every tensor (from_pretrained reads all)
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            # load_file maps the file lazily on CPU: copy every tensor into its own memory,
            # as from_pretrained's load_state_dict (or .to("cuda")) does.
            loaded = load_file(str(f), device=device)
            sd.update({k: t.clone() for k, t in loaded.items()} if device == "cpu" else loaded)
        models.append(sd)
    base, aligned = models
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    proj: dict[str, torch.Tensor] = {}  # official get_aligned_matrix: C = V Vᵀ/‖V‖
    for name in base:
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
            v = aligned[name].float() - base[name].float()
            proj[module] = torch.mm(v, v.t()) / torch.norm(v)
    del models, base, aligned

    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    ad = load_file(str(weights), device=device)
    cos: dict[str, float] = {}
    projected: list[str] = []
    for key in list(ad):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        b_key = key.replace("lora_A", "lora_B")
        a, b = ad[key].float(), ad[b_key].float()
        w = torch.mm(proj[module], b)
        fw, ori = torch.mm(w, a), torch.mm(b, a)  # official: dense d_out x d_in products
        c = round(F.cosine_similarity(fw.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
        cos[module] = c
        if c <= threshold:
            ad[b_key] = w.to(ad[b_key].dtype)
            projected.append(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous().cpu() for k, t in ad.items()},
              str(out_dir / "adapter_model.safetensors"), metadata)
    shutil.copyfile(adapter_dir / "adapter_config.json", out_dir / "adapter_config.json")
    if device == "cuda":
        torch.cuda.synchronize()
        del proj, ad
        torch.cuda.empty_cache()  # give the GPU memory back to our workers' processes
    return {"s": time.perf_counter() - t0, "load_s": t_load,
            "compute_write_s": time.perf_counter() - t1, "cos": cos,
            "projected": sorted(projected)}


class Comparison:
    """Our sanitized adapters vs the baseline's (projected modules and B values), checked
    after each of our runs for the baseline adapters that run covered."""

    def __init__(self, pool_adapters: list[Path], pool_root: Path, baseline_out: Path) -> None:
        self.pool, self.root, self.baseline_out = pool_adapters, pool_root, baseline_out
        self.done: dict[int, tuple[bool, float, str | None]] = {}

    def check_run(self, out_uri: str, n: int, baseline: list[dict[str, Any]]) -> None:
        from safetensors.torch import load, load_file

        from safelora_ray.storage import open_storage

        st = open_storage(out_uri)
        for b in baseline:
            i = b["index"]
            if i >= n or i in self.done:
                continue
            aid = self.pool[i].relative_to(self.root).as_posix()
            src = load_file(str(self.pool[i] / "adapter_model.safetensors"))
            mine = load(st.read(f"{aid}/adapter_model.safetensors"))
            theirs = load_file(str(self.baseline_out / aid / "adapter_model.safetensors"))
            if set(mine) != set(theirs):
                self.done[i] = (False, float("inf"), f"{aid}: different tensor names")
                continue
            sel = sorted(k[len("base_model.model."): -len(".lora_B.weight")] for k in mine
                         if k.endswith("lora_B.weight") and not torch.equal(mine[k], src[k]))
            rel = 0.0
            for k in mine:
                x, y = mine[k].float(), theirs[k].float()
                rel = max(rel, float((x - y).abs().max()) / (float(y.abs().max()) or 1.0))
            same = sel == b["projected"]
            self.done[i] = (same, rel, None if same else
                            f"{aid}: ours projected {sel}, baseline {b['projected']}")

    def summary(self, baseline: list[dict[str, Any]]) -> dict[str, Any]:
        same = sum(1 for ok, _, _ in self.done.values() if ok)
        rel = max((r for _, r, _ in self.done.values()), default=0.0)
        wanted = len({b["index"] for b in baseline})
        return {"adapters_compared": len(self.done), "same_selection": same,
                "max_abs_diff_over_max_abs": rel,
                "differences": [d for _, _, d in self.done.values() if d][:10],
                # one bf16 rounding step of the largest |B| (C is float32 on both sides, the
                # norm float64 here and float32 there: the cast to bf16 may round either way)
                "equal": (len(self.done) == wanted and same == len(self.done)
                          and rel <= 2**-7)}
