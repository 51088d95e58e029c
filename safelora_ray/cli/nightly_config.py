"""The nightly's configuration (``jobs/nightly.example.yaml``): catalogs, model pairs, the
selection and the pipelines' extra settings, checked when read, errors naming the YAML key."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from safelora_ray.core.errors import ConfigError, NotFoundError
from safelora_ray.core.merge import COMBINATIONS, parse_weights
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import as_yaml_keys
from safelora_ray.planning.catalog import validate_id
from safelora_ray.planning.plan import parse_targets
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import Output, check_outputs
from safelora_ray.storage.lease import DEFAULT_TTL_S
from safelora_ray.storage.uri import check_uri, join_uri, refuse_overlap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSpec:
    """A base/aligned model pair and the adapters' base model ids that map to it.

    Attributes:
        safety_adapter: A safety LoRA adapter for the pair's model: its adapters are then
            sanitized with SafeMERGE (``--method safemerge``, SPEC §5) instead of Safe LoRA.
        weights: SafeMERGE's (w_f, w_s) (default 0.8, 0.2); only with ``safety_adapter``.
        combination: ``linear`` (default) or ``cat``; only with ``safety_adapter``.
    """

    name: str
    base: str
    aligned: str
    targets: tuple[str, ...]
    base_model_ids: tuple[str, ...]
    safety_adapter: str | None = None
    weights: tuple[float, float] | None = None
    combination: str | None = None

    def method_kwargs(self) -> dict[str, Any]:
        """The SanitizeConfig fields of the pair's method (none for Safe LoRA)."""
        if self.safety_adapter is None:
            return {}
        return {"method": "safemerge", "safety_adapter": self.safety_adapter,
                "weights": self.weights, "combination": self.combination}


@dataclass(frozen=True)
class CatalogSpec:
    """A catalog of adapters (directory tree or manifest).

    Attributes:
        name: Its name; its adapters go to ``<output_root>/<name>/``.
        uri: The catalog's URI.
        allow_empty: An empty catalog is an error (a mistyped URI would otherwise make a
            nightly that silently does nothing) unless this is set.
    """

    name: str
    uri: str
    allow_empty: bool = False


@dataclass(frozen=True)
class ModelCatalogSpec:
    """A catalog of full fine-tunes of one pair's aligned model (every directory holding
    ``model.safetensors[.index.json]`` is a model, its id its path).

    Attributes:
        allow_empty: As for :class:`CatalogSpec`: an empty catalog is an error unless set.
    """

    name: str
    uri: str
    pair: str
    allow_empty: bool = False


@dataclass
class NightlyConfig:
    """The nightly configuration (see ``jobs/nightly.example.yaml``).

    Attributes:
        output_root: Sanitized adapters go to ``<output_root>/<catalog>/<id>/``.
        alignment_root: Alignment sets live at ``<alignment_root>/<pair>/``.
        catalogs: The catalogs.
        pairs: The model pairs.
        selection: ``{"threshold": T}`` or ``{"num_proj_layers": K, "strict_k": bool}``.
        lock_ttl_s: ``lock.ttl_s``: seconds without a renewal after which the lease counts
            as abandoned (renewed every ttl_s / 6; a holder that died on this host is taken
            over at once).
        sanitize: Extra SanitizeConfig fields (batch_size, max_in_flight, workers, use_gpu,
            workers_per_gpu, task_timeout_s, tenant_depth).
        build: Extra BuildConfig fields (workers, use_gpu, max_file_bytes).
        models: Catalogs of full fine-tunes to project (``project-model``).
        project: Extra FinetuneConfig fields (workers, use_gpu, task_timeout_s, chunk_bytes).
    """

    output_root: str
    alignment_root: str
    catalogs: list[CatalogSpec]
    pairs: list[PairSpec]
    selection: dict[str, Any]
    lock_ttl_s: float = DEFAULT_TTL_S
    sanitize: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    models: list[ModelCatalogSpec] = field(default_factory=list)
    project: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output_root or not self.alignment_root:
            raise ConfigError("output_root and alignment_root are required")
        if not self.catalogs and not self.models:
            raise ConfigError("at least one catalog is required (catalogs: or models:)")
        if not self.pairs:
            raise ConfigError("at least one model pair is required")
        for kind, names in (("catalog", [c.name for c in self.catalogs]
                             + [m.name for m in self.models]),
                            ("pair", [p.name for p in self.pairs])):
            if len(set(names)) != len(names):
                raise ConfigError(f"{kind} names must be unique: {names}")
            for n in names:
                if "/" in n:
                    raise ConfigError(f"{kind} name {n!r} may not contain '/'")
                validate_id(n)
        owners: dict[str, str] = {}
        for p in self.pairs:
            for mid in p.base_model_ids:
                if mid in owners:
                    raise ConfigError(f"base model id {mid!r} maps to both {owners[mid]!r} and "
                                      f"{p.name!r}")
                owners[mid] = p.name
        allowed = {"threshold", "num_proj_layers", "strict_k"}
        extra = set(self.selection) - allowed
        if extra:
            raise ConfigError(f"unknown selection keys: {sorted(extra)}")
        allowed_s = {"batch_size", "max_in_flight", "workers", "use_gpu", "task_timeout_s",
                     "workers_per_gpu", "tenant_depth"}
        if set(self.sanitize) - allowed_s:
            raise ConfigError(f"unknown sanitize keys: {sorted(set(self.sanitize) - allowed_s)}")
        allowed_b = {"workers", "use_gpu", "max_file_bytes", "task_timeout_s"}
        if set(self.build) - allowed_b:
            raise ConfigError(f"unknown build keys: {sorted(set(self.build) - allowed_b)}")
        allowed_p = {"workers", "use_gpu", "task_timeout_s", "chunk_bytes"}
        if set(self.project) - allowed_p:
            raise ConfigError(f"unknown project keys: {sorted(set(self.project) - allowed_p)}")
        pair_names = {p.name for p in self.pairs}
        for m in self.models:
            if m.pair not in pair_names:
                raise ConfigError(f"models catalog {m.name!r}: pair {m.pair!r} is not one of "
                                  f"the configured pairs {sorted(pair_names)}")
        # Validate the selection now, not at the first sanitize, in the YAML's own terms.
        try:
            Selection(**self._selection_kwargs())
        except ConfigError as e:
            raise ConfigError(as_yaml_keys(str(e), "selection")) from None
        if self.lock_ttl_s <= 0:
            raise ConfigError("lock.ttl_s must be positive")
        if self.lock_ttl_s > 3600:  # a config written when ttl_s was the run's whole length
            logger.warning("lock.ttl_s is %g s: a run that dies on another host keeps the "
                           "lock that long (it is seconds without a renewal, renewed every "
                           "ttl_s/6; default %g s)", self.lock_ttl_s, DEFAULT_TTL_S)
        check_uri(self.output_root, "output_root")
        check_uri(self.alignment_root, "alignment_root")
        catalogs = [*(("catalogs", c) for c in self.catalogs),
                    *(("models", m) for m in self.models)]
        for section, c in catalogs:
            check_uri(c.uri, f"{section}[{c.name}].uri")
        for p in self.pairs:
            for side in ("base", "aligned"):
                check_uri(getattr(p, side), f"pairs[{p.name}].{side}")
            _check_merge(p)
        # Neither root equals, lies inside or contains anything a run reads.
        check_outputs(self.outputs, [
            *((f"{section}[{c.name}].uri", c.uri, "the outputs would overwrite the originals "
               "or become catalog entries of the next run") for section, c in catalogs),
            *((f"pairs[{p.name}].{side}", getattr(p, side), "the run would write into a "
               "source checkout") for p in self.pairs for side in ("base", "aligned")),
            *((f"pairs[{p.name}].safety_adapter", p.safety_adapter, "the run would write "
               "into the safety adapter") for p in self.pairs if p.safety_adapter)])
        for _, c in catalogs:
            cat_out = join_uri(self.output_root, c.name)
            refuse_overlap(self.alignment_root, "alignment_root", cat_out,
                           f"the output of catalog {c.name!r}",
                           "alignment sets and sanitized adapters would mix")

    @property
    def outputs(self) -> list[Output]:
        """What a run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("output_root", self.output_root),
                Output("alignment_root", self.alignment_root)]

    def _selection_kwargs(self) -> dict[str, Any]:
        s = self.selection
        return {"threshold": s.get("threshold"), "num_proj_layers": s.get("num_proj_layers"),
                "strict_k": bool(s.get("strict_k", False))}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> NightlyConfig:
        """Build from parsed YAML; errors name the offending key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: the top level must be a mapping")
        known = {"output_root", "alignment_root", "catalogs", "pairs", "selection", "lock",
                 "sanitize", "build", "models", "project"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            # A mistyped key (``urii:``) is refused, not silently left out of the entry.
            catalogs = [CatalogSpec(str(c["name"]), str(c["uri"]),
                                    allow_empty=_flag_value(c, "allow_empty"))
                        for c in _entries(raw, "catalogs", where, _CATALOG_KEYS)]
            models = [ModelCatalogSpec(str(m["name"]), str(m["uri"]), str(m["pair"]),
                                       allow_empty=_flag_value(m, "allow_empty"))
                      for m in _entries(raw, "models", where, _MODELS_KEYS)]
            pairs = [
                PairSpec(
                    name=str(p["name"]), base=str(p["base"]), aligned=str(p["aligned"]),
                    targets=parse_targets(p.get("targets", ["q_proj", "v_proj"])),
                    base_model_ids=tuple(str(x) for x in p.get("base_model_ids", [])),
                    safety_adapter=(None if p.get("safety_adapter") is None
                                    else str(p["safety_adapter"])),
                    weights=_weights(p, f"{where}: pairs[{p.get('name')}]"),
                    combination=p.get("combination"),
                )
                for p in _entries(raw, "pairs", where, _PAIR_KEYS)
            ]
            if raw.get("lock") is not None:
                _check_keys(raw["lock"], f"{where}: lock", {"ttl_s"})
            return cls(
                output_root=str(raw["output_root"]).rstrip("/"),
                alignment_root=str(raw["alignment_root"]).rstrip("/"),
                catalogs=catalogs, pairs=pairs, selection=dict(raw.get("selection") or {}),
                lock_ttl_s=float((raw.get("lock") or {}).get("ttl_s", DEFAULT_TTL_S)),
                sanitize=dict(raw.get("sanitize") or {}), build=dict(raw.get("build") or {}),
                models=models, project=dict(raw.get("project") or {}),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: missing or malformed entry: {e}") from e

    @classmethod
    def load(cls, uri: str) -> NightlyConfig:
        """Read a YAML config from a path or URI."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        try:
            raw = open_storage(parent or ".").read(name, max_bytes=16 * 1024**2)
        except NotFoundError as e:  # a mistyped --config is a usage error (exit 2)
            raise ConfigError(f"--config {uri}: {e}") from None
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{uri}: not valid YAML: {e}") from e
        return cls.from_dict(data, uri)


_CATALOG_KEYS = frozenset({"name", "uri", "allow_empty"})
_MODELS_KEYS = frozenset({"name", "uri", "pair", "allow_empty"})
_PAIR_KEYS = frozenset({"name", "base", "aligned", "targets", "base_model_ids",
                        "safety_adapter", "weights", "combination"})


def _weights(pair: dict[str, Any], what: str) -> tuple[float, float] | None:
    """A pair's ``weights:`` ([w_f, w_s] or "w_f,w_s"), checked."""
    if pair.get("weights") is None:
        return None
    try:
        return parse_weights(pair["weights"])
    except ConfigError as e:
        raise ConfigError(f"{what}: {str(e).replace('--weights', 'weights')}") from None


def _check_merge(p: PairSpec) -> None:
    """A pair's SafeMERGE keys: weights and combination only with a safety adapter."""
    what = f"pairs[{p.name}]"
    if p.safety_adapter is None:
        for key in ("weights", "combination"):
            if getattr(p, key) is not None:
                raise ConfigError(f"{what}.{key} is only used with {what}.safety_adapter "
                                  "(SafeMERGE)")
        return
    check_uri(p.safety_adapter, f"{what}.safety_adapter")
    if p.combination is not None and p.combination not in COMBINATIONS:
        raise ConfigError(f"{what}.combination must be one of {', '.join(COMBINATIONS)}, got "
                          f"{p.combination!r}")


def _entries(raw: dict[str, Any], section: str, where: str,
             known: frozenset[str]) -> list[dict[str, Any]]:
    """The entries of a list section, each a mapping with only ``known`` keys.

    Raises:
        ConfigError: naming the section, the entry and the unknown key (and the near one).
    """
    entries = raw.get(section) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: {section} must be a list of entries")
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        _check_keys(entry, f"{where}: {section}[{name if name is not None else i}]", known)
    return entries


def _check_keys(entry: Any, what: str, known: Iterable[str]) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{what} must be a mapping, got {entry!r}")
    for key in sorted(set(entry) - set(known), key=str):
        near = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{what}: unknown key {key!r}{hint}; known keys: "
                          f"{', '.join(sorted(known))}")


def _flag_value(entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


__all__ = ["CatalogSpec", "ModelCatalogSpec", "NightlyConfig", "PairSpec"]
