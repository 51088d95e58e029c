import json, glob, statistics as st, os
os.chdir("/tmp/bench")
def load(p):
    try: return json.load(open(p))
    except Exception: return None
print("## build (7B-shaped, 4 layers, 2 CPU workers, warm): build_s per run")
for side in ("old","new"):
    runs=[]
    for f in sorted(glob.glob(f"build-{side}-*.json")):
        d=load(f); runs += [r["build_s"] for r in d["runs"]] if d else []
    print(side, "runs", runs, "median", round(st.median(runs),2) if runs else None)
print("## fleet (134M-shaped, r=8 q/v): sanitize_s per run, by mode/n")
rows={}
for side in ("old","new"):
    for f in sorted(glob.glob(f"fleet-{side}-*.json")):
        d=load(f)
        if not d: continue
        for res in d["results"]:
            k=(res["mode"],res["n"])
            rows.setdefault(k,{}).setdefault(side,{"san":[], "tot":[], "rss":[]})
            for r in res["runs"]:
                rows[k][side]["san"].append(r["sanitize_s"]); rows[k][side]["tot"].append(r["s"])
            rows[k][side]["rss"].append(res["peak_total_rss_median"]/2**20)
for k in sorted(rows):
    line=[f"{k[0]} n={k[1]}"]
    for side in ("old","new"):
        v=rows[k].get(side)
        if v: line.append(f"{side}: sanitize median {st.median(v['san']):.3f} s (n={len(v['san'])}, runs {sorted(round(x,2) for x in v['san'])}), job median {st.median(v['tot']):.3f}, adapters/s {k[1]/st.median(v['san']):.1f}, RSS {st.median(v['rss']):.0f} MiB")
    print(" | ".join(line))
for name in ("finetune","setload"):
    for side in ("old","new"):
        d=load(f"{name}-{side}.json")
        if d: print(name, side, json.dumps(d.get("summary", {}))[:700])
