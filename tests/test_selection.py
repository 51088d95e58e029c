"""The SPEC §2 selection as one frozen value: checked once, recorded as ledgers and reports
have always recorded it, applied by the workers unchanged."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.selection import Selection
from safelora_ray.pipelines.sanitize.config import SanitizeConfig


@pytest.mark.parametrize(("sel", "record"), [
    (Selection(0.35), {"mode": "threshold", "threshold": 0.35}),
    (Selection(threshold=1), {"mode": "threshold", "threshold": 1}),
    (Selection(num_proj_layers=3), {"mode": "number", "num_proj_layers": 3, "strict": False}),
    (Selection(num_proj_layers=3, strict_k=True),
     {"mode": "number", "num_proj_layers": 3, "strict": True}),
    (Selection(method="salora"), {"mode": "all", "method": "salora"}),
    (Selection(0.2, method="salora"), {"mode": "threshold", "threshold": 0.2, "method": "salora"}),
])
def test_the_record_is_the_on_disk_form(sel: Selection, record: dict) -> None:
    assert sel.record() == record
    assert list(sel.record()) == list(record)  # key order too (summary.json is not sorted)
    assert json.dumps(sel.record()) == json.dumps(record)


def test_checked_once_with_the_flag_messages() -> None:
    with pytest.raises(ConfigError, match="give exactly one of --threshold or --num-proj-layers"):
        Selection()
    with pytest.raises(ConfigError, match="give at most one of"):
        Selection(0.3, 2, method="salora")
    with pytest.raises(ConfigError, match=r"did you mean 0\.35\?"):
        Selection(35)
    with pytest.raises(ConfigError, match="--strict-k needs --num-proj-layers"):
        Selection(0.3, strict_k=True)
    with pytest.raises(ConfigError, match="--num-proj-layers must be ≥ 1, got 0"):
        SanitizeConfig(alignment="/a", adapters="/b", out="/c", num_proj_layers=0)


def test_frozen_hashable_and_carried_as_is() -> None:
    sel = SanitizeConfig(alignment="/a", adapters="/b", out="/c", num_proj_layers=2,
                         strict_k=True).selection
    assert sel == Selection(None, 2, True) and hash(sel) == hash(Selection(None, 2, True))
    assert pickle.loads(pickle.dumps(sel)) == sel  # what a Ray task receives
    with pytest.raises(AttributeError):
        sel.threshold = 0.1  # type: ignore[misc]


def test_pick_applies_the_rule() -> None:
    cos = {"a": 0.1, "b": 0.3, "c": 0.3, "d": 0.9, "z": math.nan}
    assert Selection(0.3).pick(cos) == {"a", "b", "c"}
    assert Selection(num_proj_layers=2).pick(cos) == {"a", "b", "c"}  # ties included
    assert Selection(num_proj_layers=2, strict_k=True).pick(cos) == {"a", "b"}
    assert Selection(method="salora").pick(cos) == set(cos)  # every module, a zero update's too
