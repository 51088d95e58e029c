"""The deployment files under ``cluster/`` parse, have the keys KubeRay / Kubernetes / the Ray
cluster launcher need, hold no credentials, and every ``python jobs/<name>.py ...`` command in
them names an existing job script with flags its parser accepts. Offline and fast: only YAML
parsing and argparse."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from safelora_ray.cli.main import build_parser as cli_build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
JOBS = REPO / "jobs"

RAY_VERSION = "2.60.0"
TORCH_PIN = "torch==2.13.0"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
GPU = "nvidia.com/gpu"
# The fields of the RayCronJob spec (KubeRay v1.6: schedule, jobTemplate, suspend; v1.7 adds
# timeZone). Anything else (e.g. a CronJob-style concurrencyPolicy) is not in the CRD.
RAYCRONJOB_SPEC_KEYS = {"schedule", "jobTemplate", "suspend", "timeZone"}
# Field names of the ray.io/v1 Go types (raycluster_types.go, rayjob_types.go), to catch typos;
# extend when a manifest starts using another documented field.
RAYCLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion",
                        "enableInTreeAutoscaling", "autoscalerOptions", "headServiceAnnotations",
                        "suspend", "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy",
                        "authOptions"}
HEAD_GROUP_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                     "rayStartParams", "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_OPTION_KEYS = {"resources", "image", "imagePullPolicy", "env", "envFrom",
                          "volumeMounts", "securityContext", "idleTimeoutSeconds",
                          "upscalingMode", "version"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec",
                    "submitterPodTemplate", "metadata", "clusterSelector", "submitterConfig",
                    "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId",
                    "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes",
                    "suspend"}
RAYJOB_LIFECYCLE_KEYS = ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                         "activeDeadlineSeconds", "backoffLimit")

EXPECTED_FILES = [
    "README.md",
    "image/Dockerfile",
    "image/README.md",
    "kuberay/README.md",
    "kuberay/serviceaccount.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-build.yaml",
    "kuberay/nightly-configmap.yaml",
    "kuberay/raycronjob-nightly.yaml",
    "kuberay/cronjob-submit-rayjob.yaml",
    "launcher/README.md",
    "launcher/aws-gpu.yaml",
]

CREDENTIAL_PATTERNS = [
    re.compile(r"A[KS]IA[0-9A-Z]{16}"),                      # AWS access key ids (long/temporary)
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"aws_session_token", re.IGNORECASE),
    re.compile(r"hf_[A-Za-z0-9]{30,}"),                      # Hugging Face tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# helpers


def _files(*suffixes: str) -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def _yaml_files() -> list[Path]:
    return _files(".yaml", ".yml")


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _embedded_manifests(doc: Any) -> Iterator[dict]:
    """Kubernetes objects kept as YAML text in a ConfigMap (e.g. the nightly RayJob template)."""
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        for text in (doc.get("data") or {}).values():
            try:
                inner = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue
            for d in inner:
                if isinstance(d, dict) and "apiVersion" in d and "kind" in d:
                    yield d


def _k8s_objects(include_embedded: bool = True) -> list[tuple[str, dict]]:
    """(where, object) for every Kubernetes object under cluster/kuberay/."""
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            out.append((path.name, doc))
            if include_embedded:
                out.extend((f"{path.name} (embedded)", d) for d in _embedded_manifests(doc))
    return out


def _objects(kind: str, file: str | None = None) -> list[tuple[str, dict]]:
    return [(w, d) for w, d in _k8s_objects()
            if d.get("kind") == kind and (file is None or w.startswith(file))]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _pod_specs(obj: Any) -> Iterator[dict]:
    for node in _walk(obj):
        if isinstance(node, dict) and isinstance(node.get("containers"), list):
            yield node


def _containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or [])


def _gpus(container: dict, which: tuple[str, ...] = ("limits", "requests")) -> int:
    res = container.get("resources") or {}
    return max(int((res.get(k) or {}).get(GPU, 0)) for k in which)


# --------------------------------------------------------------------------------------------
# files and parsing


def test_expected_files_exist() -> None:
    missing = [f for f in EXPECTED_FILES if not (CLUSTER / f).is_file()]
    assert not missing, f"missing under cluster/: {missing}"
    for d in [CLUSTER, *(p for p in CLUSTER.rglob("*") if p.is_dir())]:
        assert (d / "README.md").is_file(), f"{d.relative_to(REPO)} has no README.md"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", _files(""), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_credentials(path: Path) -> None:
    text = path.read_text(errors="replace")
    for pat in CREDENTIAL_PATTERNS:
        m = pat.search(text)
        assert m is None, f"{path.relative_to(REPO)} contains something like a credential: {m[0]!r}"


def test_secret_env_vars_come_from_secrets() -> None:
    """An env var that looks secret (HF_TOKEN, ...) is only ever read from a Secret."""
    for where, obj in _k8s_objects():
        for pod in _pod_specs(obj):
            for c in _containers(pod):
                for env in c.get("env") or []:
                    if SECRET_ENV_NAME.search(env["name"]):
                        assert "value" not in env, f"{where}: {env['name']} has a literal value"
                        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                        assert ref and ref.get("name") and ref.get("key"), \
                            f"{where}: {env['name']} must use valueFrom.secretKeyRef"


# --------------------------------------------------------------------------------------------
# KubeRay / Kubernetes manifests


def test_manifests_have_api_version_kind_and_name() -> None:
    objs = _k8s_objects()
    assert objs
    for where, d in objs:
        assert d.get("apiVersion") and d.get("kind"), f"{where}: apiVersion/kind missing"
        assert (d.get("metadata") or {}).get("name"), f"{where}: {d['kind']} has no metadata.name"
        if d["kind"] in RAY_KINDS:
            assert d["apiVersion"] == "ray.io/v1", f"{where}: {d['kind']} must be ray.io/v1"
    kinds = {(w.split(" ")[0], d["kind"]) for w, d in objs}
    for file, kind in [
        ("serviceaccount.yaml", "ServiceAccount"),
        ("raycluster.yaml", "RayCluster"),
        ("rayjob-build.yaml", "RayJob"),
        ("nightly-configmap.yaml", "ConfigMap"),
        ("raycronjob-nightly.yaml", "RayCronJob"),
        ("cronjob-submit-rayjob.yaml", "CronJob"),
        ("cronjob-submit-rayjob.yaml", "ServiceAccount"),
        ("cronjob-submit-rayjob.yaml", "Role"),
        ("cronjob-submit-rayjob.yaml", "RoleBinding"),
        ("cronjob-submit-rayjob.yaml", "RayJob"),   # the embedded nightly template
    ]:
        assert (file, kind) in kinds, f"no {kind} in kuberay/{file}"


def _ray_cluster_specs() -> list[tuple[str, dict, str]]:
    """(where, rayClusterSpec, owner kind) for every Ray cluster defined in the manifests."""
    out = []
    for where, d in _k8s_objects():
        spec = d.get("spec") or {}
        if d["kind"] == "RayCluster":
            out.append((where, spec, "RayCluster"))
        elif d["kind"] == "RayJob":
            out.append((where, spec.get("rayClusterSpec"), "RayJob"))
        elif d["kind"] == "RayCronJob":
            out.append((where, (spec.get("jobTemplate") or {}).get("rayClusterSpec"), "RayCronJob"))
    return out


def test_ray_cluster_specs() -> None:
    specs = _ray_cluster_specs()
    assert {k for _, _, k in specs} == RAY_KINDS
    for where, spec, kind in specs:
        assert isinstance(spec, dict), f"{where}: {kind} has no Ray cluster spec"
        assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{where}: {set(spec) - RAYCLUSTER_SPEC_KEYS}"
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_KEYS, where
        for g in spec.get("workerGroupSpecs") or []:
            assert set(g) <= WORKER_GROUP_KEYS, f"{where}: {set(g) - WORKER_GROUP_KEYS}"
        assert set(spec.get("autoscalerOptions") or {}) <= AUTOSCALER_OPTION_KEYS, where
        assert str(spec.get("rayVersion")) == RAY_VERSION, f"{where}: rayVersion"
        head = spec["headGroupSpec"]
        params = head.get("rayStartParams") or {}
        assert params.get("num-gpus") == "0", f"{where}: head needs rayStartParams num-gpus: '0'"
        groups = spec.get("workerGroupSpecs") or []
        for group in [head, *groups]:
            for k, v in (group.get("rayStartParams") or {}).items():
                assert isinstance(v, str), f"{where}: rayStartParams {k} must be a string"
        head_pod = head["template"]["spec"]
        for c in _containers(head_pod):
            assert _gpus(c) == 0, f"{where}: the head must not ask for a GPU"
            res = c.get("resources") or {}
            assert res.get("requests") and res.get("limits"), f"{where}: head resources"
        gpu_groups = [g for g in groups
                      if any(_gpus(c) >= 1 for c in _containers(g["template"]["spec"]))]
        assert gpu_groups, f"{where}: no worker group with {GPU} limits"
        for g in gpu_groups:
            pod = g["template"]["spec"]
            assert any(_gpus(c, ("limits",)) >= 1 for c in _containers(pod)), \
                f"{where}: {g['groupName']}: {GPU} must be in the limits"
            tolerated = {t.get("key") for t in pod.get("tolerations") or []}
            assert GPU in tolerated, f"{where}: {g['groupName']} does not tolerate {GPU}"
            assert g.get("groupName")
            lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas")
            assert hi is not None and 0 <= lo <= n <= hi, f"{where}: replicas out of bounds"
        images = set()
        for pod in [head_pod, *(g["template"]["spec"] for g in groups)]:
            assert pod.get("serviceAccountName"), f"{where}: Ray pods need the IRSA account"
            for c in pod["containers"]:
                images.add(c["image"])
                env = {e["name"] for e in c.get("env") or []}
                assert "AWS_REGION" in env, f"{where}: {c['name']} has no AWS_REGION"
        assert len(images) == 1, f"{where}: head and workers should run one image: {images}"
        assert all(RAY_VERSION in i for i in images), f"{where}: image not Ray {RAY_VERSION}"
        if kind == "RayCluster":
            assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling"
            # Build/sanitize size their pool from the GPUs present when they start.
            assert all(g.get("minReplicas", 0) >= 1 for g in gpu_groups), \
                f"{where}: keep at least one GPU worker"


def test_ray_pods_keep_the_object_store_in_memory() -> None:
    """Every Ray pod mounts an in-memory emptyDir at /dev/shm: Kubernetes gives a container a
    64 MB /dev/shm, and Ray then keeps its object store on disk. The store carries a GPU
    holder's requests and the alignment set of a CPU-only node."""
    for where, spec, _ in _ray_cluster_specs():
        groups = [spec["headGroupSpec"], *(spec.get("workerGroupSpecs") or [])]
        for group in groups:
            pod = group["template"]["spec"]
            shm = {v["name"] for v in pod.get("volumes") or []
                   if (v.get("emptyDir") or {}).get("medium") == "Memory"}
            for c in _containers(pod):
                mounts = {m["name"] for m in c.get("volumeMounts") or []
                          if m.get("mountPath") == "/dev/shm"}
                assert mounts & shm, f"{where}: {c['name']} has no in-memory /dev/shm"


def _ray_job_specs() -> list[tuple[str, dict]]:
    out = [(w, d["spec"]) for w, d in _objects("RayJob")]
    out += [(w, d["spec"]["jobTemplate"]) for w, d in _objects("RayCronJob")]
    return out


def test_ray_job_lifecycle_and_entrypoint() -> None:
    specs = _ray_job_specs()
    assert len(specs) >= 3
    for where, spec in specs:
        assert set(spec) <= RAYJOB_SPEC_KEYS, f"{where}: not RayJob fields: " \
            f"{set(spec) - RAYJOB_SPEC_KEYS}"
        missing = [k for k in RAYJOB_LIFECYCLE_KEYS if k not in spec]
        assert not missing, f"{where}: missing RayJob lifecycle keys {missing}"
        assert spec["shutdownAfterJobFinishes"] is True, where
        for k in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
            assert isinstance(spec[k], int) and spec[k] >= 0, f"{where}: {k}"
        assert spec["activeDeadlineSeconds"] > 0, where
        assert spec.get("submissionMode") == "K8sJobMode", where
        entry = spec.get("entrypoint", "")
        assert _commands_in_text(entry), f"{where}: entrypoint is not python jobs/<name>.py"
        # K8sJobMode pastes the entrypoint into the submitter's shell command.
        assert not re.search(r";|&&|\|\||\$\(|`", entry), f"{where}: one command only: {entry!r}"
        if "runtimeEnvYAML" in spec:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert isinstance(env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"


def test_submission_ids_follow_the_pattern() -> None:
    (where, build), = _objects("RayJob", "rayjob-build.yaml")
    assert re.fullmatch(r"build-[a-z0-9-]+-yyyymmdd", build["metadata"]["name"]), where
    assert build["spec"]["jobId"] == build["metadata"]["name"], where
    (where, nightly), = _objects("RayJob", "cronjob-submit-rayjob.yaml")
    assert nightly["metadata"]["name"] == nightly["spec"]["jobId"] == "nightly-yyyymmdd", where
    (_, cron), = _objects("CronJob")
    script = "\n".join(_walk_strings(cron))
    assert 'nightly-$(date -u +%Y%m%d)' in script
    assert "s/nightly-yyyymmdd/" in script


def test_raycronjob() -> None:
    (where, rcj), = _objects("RayCronJob")
    spec = rcj["spec"]
    assert spec["schedule"] == "0 2 * * *", where
    assert set(spec) <= RAYCRONJOB_SPEC_KEYS, f"{where}: not RayCronJob fields: " \
        f"{set(spec) - RAYCRONJOB_SPEC_KEYS}"
    assert "jobs/nightly.py" in spec["jobTemplate"]["entrypoint"]
    # The two nightly variants run the same thing.
    (_, template), = _objects("RayJob", "cronjob-submit-rayjob.yaml")
    assert template["spec"]["entrypoint"] == spec["jobTemplate"]["entrypoint"]


def test_cronjob_submitter() -> None:
    (where, cron), = _objects("CronJob")
    assert cron["apiVersion"] == "batch/v1", where
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5, where
    assert spec["concurrencyPolicy"] == "Forbid", where
    assert isinstance(spec.get("startingDeadlineSeconds"), int), where
    assert isinstance(spec.get("successfulJobsHistoryLimit"), int), where
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    # The submitter's ServiceAccount may create and get RayJobs.
    roles = {d["metadata"]["name"]: d for _, d in _objects("Role")}
    granted: set[str] = set()
    for _, rb in _objects("RoleBinding"):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
               for s in rb.get("subjects") or []):
            for rule in roles[rb["roleRef"]["name"]].get("rules") or []:
                if "ray.io" in rule.get("apiGroups", []) and "rayjobs" in rule.get("resources", []):
                    granted |= set(rule.get("verbs") or [])
    assert {"create", "get"} <= granted, f"{where}: {sa} cannot create/get rayjobs.ray.io"


def test_references_resolve_and_share_a_namespace() -> None:
    objs = _k8s_objects(include_embedded=False)
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in objs}
    for where, d in _k8s_objects():
        for pod in _pod_specs(d):
            sa = pod.get("serviceAccountName")
            if sa:
                assert ("ServiceAccount", sa) in defined, f"{where}: no ServiceAccount {sa}"
            for vol in pod.get("volumes") or []:
                cm = vol.get("configMap")
                if cm and not cm.get("optional"):
                    assert ("ConfigMap", cm["name"]) in defined, f"{where}: no ConfigMap {cm}"
    namespaces = {d["metadata"].get("namespace") for _, d in objs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"namespaces: {namespaces}"
    ns = {d["metadata"]["name"] for _, d in objs if d["kind"] == "Namespace"}
    assert ns <= namespaces


def test_irsa_service_account() -> None:
    accounts = {d["metadata"]["name"]: d for _, d in _objects("ServiceAccount",
                                                                "serviceaccount.yaml")}
    used = {pod.get("serviceAccountName") for _, spec, _ in _ray_cluster_specs()
            for pod in _pod_specs(spec)}
    assert used and used <= set(accounts)
    for name in used:
        arn = (accounts[name]["metadata"].get("annotations") or {}).get(
            "eks.amazonaws.com/role-arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), f"{name}: {arn!r}"


def test_nightly_configmap_matches_the_example() -> None:
    (where, cm), = _objects("ConfigMap", "nightly-configmap.yaml")
    embedded = yaml.safe_load(cm["data"]["nightly.yaml"])
    example = yaml.safe_load((JOBS / "nightly.example.yaml").read_text())
    assert isinstance(embedded, dict), where
    assert set(embedded) == set(example), \
        f"{where}: top-level keys {sorted(embedded)} != example's {sorted(example)}"
    try:
        from safelora_ray.cli.nightly import NightlyConfig
    except ImportError:
        return
    NightlyConfig.from_dict(embedded, where=where)   # raises on an invalid config


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_launcher_config() -> None:
    (cfg,) = _docs(LAUNCHER)
    required = {"cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "setup_commands", "file_mounts"}
    assert required <= set(cfg), f"missing: {required - set(cfg)}"
    prov = cfg["provider"]
    assert prov["type"] == "aws" and prov.get("region") and prov.get("availability_zone")
    assert cfg["auth"].get("ssh_user")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not in available_node_types"
    head_t = types[head]
    assert "resources" in head_t and not (head_t["resources"] or {}).get("GPU")
    assert not head_t["node_config"]["InstanceType"].startswith(("g", "p")), "CPU head expected"
    workers = {n: t for n, t in types.items() if n != head}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile (S3)"
        assert "resources" in t
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values())
    setup = "\n".join(cfg["setup_commands"])
    assert TORCH_PIN in setup
    assert any(remote in setup for remote in cfg["file_mounts"]), \
        "setup_commands should install the repository synced by file_mounts"
    assert f"ray:{RAY_VERSION}" in cfg.get("docker", {}).get("image", f"ray:{RAY_VERSION}")


def test_launcher_config_validates_with_ray() -> None:
    """The launcher's own schema check (what `ray up` does first), offline."""
    try:
        from ray.autoscaler._private.commands import prepare_config
        from ray.autoscaler._private.util import validate_config
    except ImportError as e:  # private API of Ray; the structural test above still runs
        pytest.skip(f"Ray's launcher validation is not importable: {e}")
    (cfg,) = _docs(LAUNCHER)
    validate_config(prepare_config(cfg))


def test_dockerfile_pins() -> None:
    text = (CLUSTER / "image" / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}" in text
    assert re.search(r"TORCH_VERSION=2\.13\.0|torch==2\.13\.0", text)


# --------------------------------------------------------------------------------------------
# entrypoint commands: python jobs/<name>.py ... must parse with the job's own parser

_CMD = re.compile(r"(?<![\w/.-])python3? (jobs/[\w.-]+\.py)(?![\w.-])")
_SUBST_DATE = re.compile(r"\$\([^()]*date[^()]*\)")
_SUBST_OTHER = re.compile(r"\$\([^()]*\)|\$\{[^}]*\}|\$[A-Za-z_]\w*")

PARSERS: dict[str, Callable[[list[str]], argparse.Namespace]] = {
    "jobs/build_alignment.py": lambda a: cli_build_parser().parse_args(["build", *a]),
    "jobs/sanitize_catalog.py": lambda a: cli_build_parser().parse_args(["sanitize", *a]),
    "jobs/nightly.py": lambda a: cli_build_parser().parse_args(["nightly", *a]),
}


def _commands_in_text(text: str) -> list[tuple[str, list[str]]]:
    """(script, args) for each ``python jobs/<name>.py ...`` in ``text`` (shell-like)."""
    out = []
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        matches = list(_CMD.finditer(line))
        for i, m in enumerate(matches):
            nxt = matches[i + 1] if i + 1 < len(matches) else None
            rest = line[m.end():nxt.start() if nxt else None]
            rest = rest.split("`")[0]                        # Markdown inline code ends here
            rest = _SUBST_DATE.sub("20260101", rest)
            rest = _SUBST_OTHER.sub("X", rest)
            lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            args = []
            for tok in lex:                                  # '#' comments are dropped
                if tok and set(tok) <= set("();<>|&"):
                    break                                    # end of this command
                args.append(tok)
            out.append((m.group(1), args))
    return out


def _walk_strings(node: Any) -> Iterator[str]:
    for n in _walk(node):
        if isinstance(n, str):
            yield n


def _commands_in_yaml(path: Path) -> list[tuple[str, list[str]]]:
    text = path.read_text()
    found = []
    # Comments (not seen by the YAML parser), with their shell line continuations.
    comments = "\n".join(re.sub(r"^\s*# ?", "", ln) if ln.lstrip().startswith("#") else ""
                         for ln in text.splitlines())
    found += _commands_in_text(comments)

    def visit(node: Any) -> None:
        for s in _walk_strings(node):
            inner = None
            if "\n" in s.strip():
                try:
                    inner = [d for d in yaml.safe_load_all(s) if isinstance(d, dict | list)]
                except yaml.YAMLError:
                    inner = None
            if inner:
                for d in inner:
                    visit(d)                                  # embedded YAML (a template)
            else:
                found.extend(_commands_in_text(s))

    for doc in _docs(path):
        visit(doc)
    return found


def _all_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for path in _files(""):
        rel = str(path.relative_to(REPO))
        if path.suffix in (".yaml", ".yml"):
            cmds = _commands_in_yaml(path)
        else:
            cmds = _commands_in_text(path.read_text(errors="replace"))
        out.extend((rel, script, args) for script, args in cmds)
    return out


def test_command_extraction() -> None:
    text = ("ray job submit --submission-id nightly-$(date -u +%Y%m%d) \\\n"
            "  -- python jobs/nightly.py --config /c.yaml; echo done  # note\n"
            "see `python jobs/build_alignment.py --base a` and python3 jobs/x.py --out \"$OUT\"")
    assert _commands_in_text(text) == [
        ("jobs/nightly.py", ["--config", "/c.yaml"]),
        ("jobs/build_alignment.py", ["--base", "a"]),
        ("jobs/x.py", ["--out", "X"]),
    ]


def test_every_job_script_is_deployed() -> None:
    scripts = {script for _, script, _ in _all_commands()}
    assert set(PARSERS) <= scripts, f"not run anywhere under cluster/: {set(PARSERS) - scripts}"


def test_entrypoint_commands_parse() -> None:
    commands = _all_commands()
    assert commands
    for where, script, args in commands:
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        assert script in PARSERS, f"{where}: no known parser for {script}"
        try:
            PARSERS[script](args)
        except SystemExit as e:
            pytest.fail(f"{where}: `python {script} {shlex.join(args)}` is rejected "
                        f"by its parser (exit {e.code})")


def test_readme_submission_ids_carry_the_time() -> None:
    """Issue 20 (10): an id of the day alone allows one submission a day (Ray refuses a
    submission id it has seen); the README's and the job scripts' ids carry the time."""
    for rel in ("README.md", "jobs/nightly.py"):
        text = (REPO / rel).read_text()
        ids = re.findall(r"--submission-id (\S+?(?:\$\(date [^)]*\))?)[ \n]", text)
        assert ids, rel
        for sid in ids:
            assert sid.endswith("$(date -u +%Y%m%d-%H%M%S)"), (rel, sid)
