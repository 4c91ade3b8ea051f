"""The runs table that `ui_url()` opens in MLflow's UI: the comparison columns already chosen.

MLflow's UI shows no param or metric column until one is picked by hand. Its "share view" feature keeps a
table layout in the experiment tag `mlflow.sharedViewState.<key>` (JSON) and opens it for
`?viewStateShareKey=<key>`; the tracker writes one such view, `lcm-exp`, with
- metrics: the comparison section (`compare/<metric>/student_<n>step` for each evaluated step count, the
  teacher's DDIM at the objective's step count; `evaluation.headline_metrics`) and `train/loss`;
- params: the option of each config group that has several (`loss`, `solver`, `student`, ...) and every key
  the project's sweep studies vary (`sweeps/*.yaml`: `skip.k`, `loss.huber_c`, ...).
Each run adds its columns to the view (they accumulate across runs). Nothing here can fail a run.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Mapping

from ..config.options import groups_with_options, sweeps_dir

log = logging.getLogger(__name__)
SHARE_KEY = "lcm-exp"
TAG = "mlflow.sharedViewState." + SHARE_KEY


@functools.lru_cache(maxsize=1)
def sweep_keys() -> tuple[str, ...]:
    """The dotted keys `sweeps/*.yaml` vary (group keys like `loss` are group options, chosen separately)."""
    import yaml

    keys: list[str] = []
    for path in sorted(sweeps_dir().glob("*.yaml")):
        params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
        keys += [k for k in params if "." in k and k not in keys]
    return tuple(keys)


def metric_columns(config: Mapping[str, Any]) -> list[str]:
    ev = config.get("eval") or {}
    names = []
    objective = str(ev.get("objective") or "")
    if ev.get("enabled") and objective.startswith("eval/"):
        family = objective.rsplit("/", 1)[-1]
        names += [f"compare/{family}/student_{int(n)}step" for n in ev.get("steps") or []]
        m = re.match(r"^eval/student_(\d+)step/", objective)
        if m:
            names.append(f"compare/{family}/teacher_ddim_{m.group(1)}step")
    return names + ["train/loss"]


def columns(config: Mapping[str, Any], params: Mapping[str, str]) -> list[str]:
    """The table columns of this run, in the UI's own column keys."""
    groups = groups_with_options()
    keys = [k for k in params if k in groups] + [k for k in sweep_keys() if k in params]
    return [f"metrics.`{m}`" for m in metric_columns(config)] + [f"params.`{k}`" for k in keys]


def share(client, experiment_id: str, config: Mapping[str, Any], params: Mapping[str, str]) -> None:
    """Adds this run's columns to the experiment's `lcm-exp` view."""
    try:
        tags = client.get_experiment(experiment_id).tags
        old = json.loads(tags.get(TAG, "{}")).get("selectedColumns", [])
        new = columns(config, params)
        merged = list(old) + [c for c in new if c not in old]
        if merged != old:
            client.set_experiment_tag(experiment_id, TAG, json.dumps({"selectedColumns": merged}))
    except Exception as e:  # noqa: BLE001 - a UI nicety
        log.warning("could not write the MLflow UI view %s: %s", SHARE_KEY, e)
