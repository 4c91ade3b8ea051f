"""`lcm-exp-report`: compare the runs of a sweep from MLflow, as a table and plots in one folder.

The runs are a sweep's children (`parent=RUN_ID`, tag `mlflow.parentRunId`) or an experiment's runs matching an
MLflow search filter (`experiment=NAME filter="..."`). The swept parameters are the params whose values differ
between the runs. A param that does not apply to a run (l2's `loss.huber_c`, LoRA keys of a full student; see
`lcm_exp.tracking.applicability`, which also judges runs logged before such params were left out) is never attributed to
it: `n/a` in the table, absent from its labels, the best line and its plots. The objective (and whether it is maximised) is the runs' `lcm_exp.objective` /
`lcm_exp.objective_direction` tags. The folder holds:
- `table.md`, `table.csv`: swept parameters against final metrics, best run first;
- `<metric>_vs_<param>.png`: each metric against each swept parameter;
- `loss_curves.png`: train/loss against the step, one line per run;
- `<family>_vs_steps.png`: the LCM-style chart of an eval metric against the number of sampling steps, one line
  per run, the teacher's DDIM baseline dashed.
It is logged to the parent run as artifacts under `report/`.
"""
from __future__ import annotations

import csv
import logging
import math
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)
# params that differ between runs without being what was swept
IGNORED_PARAMS = ("tracking.run_name", "trainer.output_dir")
NA = "n/a"  # the table's cell for a param that does not apply to the run
UNITS = {"psnr_to_ref": "PSNR to the reference [dB]", "mse_to_ref": "MSE to the reference [latent units²]",
         "adherence": "prompt adherence [fraction of prompts]", "fid": "FID [lower is better]",
         "kid": "KID [lower is better]", "clip_score": "CLIP score", "train/loss": "final train/loss [a.u.]"}
PARAM_UNITS = {"skip.k": "skip-step k [timesteps]", "optim.lr": "learning rate", "ema.decay": "EMA decay μ",
               "loss.huber_c": "Huber c [latent units]", "guidance.w_min": "w_min", "guidance.w_max": "w_max"}
STEP_RE = re.compile(r"^eval/(student|teacher_ddim|teacher_dpmpp)_(\d+)step/(.+)$")


# ------------------------------------------------------------------------------------------------------ runs
def find_runs(client, parent: str | None, experiment: str | None, filter_string: str = ""):
    """(runs, parent run or None). Deleted runs are left out; the parent itself is never among the runs."""
    if parent:
        prun = client.get_run(parent)
        query = f"tags.`mlflow.parentRunId` = '{parent}'"
        if filter_string:
            query += f" and {filter_string}"
        runs = client.search_runs([prun.info.experiment_id], query, max_results=10000)
        return runs, prun
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"lcm-exp-report: no experiment named {experiment!r} in this tracking store")
    runs = client.search_runs([exp.experiment_id], filter_string or "", max_results=10000)
    runs = [r for r in runs if r.data.tags.get("lcm_exp.sweep") != "parent"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    prun = client.get_run(parents.pop()) if len(parents) == 1 and None not in parents else None
    return runs, prun


def param_value(run, key: str) -> str | None:
    """The run's value of `key`, None when the run has none or it does not apply to the run. A group's option
    (`loss`) falls back to the one named by `loss._target_` (runs logged before options were params)."""
    from ..tracking.applicability import TARGET, not_applicable, option_name

    params = run.data.params
    if key in params and key in not_applicable(params):
        return None
    if key not in params and "." not in key and params.get(f"{key}.{TARGET}"):
        return option_name(key, params[f"{key}.{TARGET}"])
    return params.get(key)


def swept_params(runs) -> list[str]:
    """Keys with at least two different values among the runs they apply to; a group's option (`loss`) stands
    for its `_target_`."""
    keys = {k for r in runs for k in r.data.params}
    keys = {k[: -len("._target_")] if k.endswith("._target_") and k.count(".") == 1 else k for k in keys}
    return sorted(k for k in keys if k not in IGNORED_PARAMS
                  and len({param_value(r, k) for r in runs} - {None}) > 1)


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def short(key: str, value=None) -> str:
    """`loss._target_` -> `loss`; `lcm_exp.distill.losses.l2` -> `l2`; floats to 4 significant digits."""
    name = key[: -len("._target_")] if key.endswith("._target_") else key
    if value is None:
        return name
    f = number(value)
    if f is not None and not str(value).lstrip("-").isdigit():
        value = f"{f:.4g}"
    elif isinstance(value, str) and "." in value and " " not in value and f is None:
        value = value.rsplit(".", 1)[-1]
    return f"{name}={value}"


def label(run, params) -> str:
    """`loss=huber, loss.huber_c=0.01`; params that do not apply to the run are left out."""
    values = [(k, param_value(run, k)) for k in params]
    return ", ".join(short(k, v) for k, v in values if v is not None) or run.info.run_name


def objective_of(runs, override: str | None = None) -> tuple[str, str]:
    from .evaluator import objective_direction

    name = override or next((r.data.tags["lcm_exp.objective"] for r in runs if r.data.tags.get("lcm_exp.objective")),
                            "train/loss")
    tags = {r.data.tags.get("lcm_exp.objective_direction") for r in runs if r.data.tags.get("lcm_exp.objective") == name}
    tags.discard(None)
    return name, tags.pop() if len(tags) == 1 else objective_direction(name)


def rank(runs, objective: str, direction: str):
    """Best first; runs without the objective (failed, nan) last."""
    def key(r):
        v = r.data.metrics.get(objective)
        if v is None or math.isnan(v):
            return (1, 0.0)
        return (0, -v if direction == "maximize" else v)
    return sorted(runs, key=key)


# ------------------------------------------------------------------------------------------------------ table
def metric_columns(runs, objective: str) -> list[str]:
    """The objective, then every student eval metric (by metric, then step count), then train/loss."""
    names = {k for r in runs for k in r.data.metrics}
    student = sorted((k for k in names if k.startswith("eval/student_") and STEP_RE.match(k)),
                     key=lambda k: (STEP_RE.match(k).group(3), int(STEP_RE.match(k).group(2))))
    cols = [objective] + [k for k in student if k != objective]
    return cols + [k for k in ("train/loss",) if k in names and k not in cols]


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def write_table(runs, params, cols, objective, direction, folder: Path, title: str) -> list[dict]:
    rows = []
    for i, r in enumerate(runs, 1):
        row = {"rank": i, "run_name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status}
        values = {k: param_value(r, k) for k in params}
        row.update({short(k): (NA if v is None else v if number(v) is not None else short(k, v).split("=", 1)[1])
                    for k, v in values.items()})
        row.update({c: r.data.metrics.get(c) for c in cols})
        rows.append(row)
    with open(folder / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["rank"])
        w.writeheader()
        w.writerows(rows)
    head = ["rank", *[short(k) for k in params], *cols, "status", "run_id"]
    lines = [f"# {title}", "", f"Best first by `{objective}` ({direction}). {len(runs)} runs; swept: "
             f"{', '.join(f'`{short(k)}`' for k in params) or '(nothing differs)'}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pcols = {short(k) for k in params}
    for row in rows:
        lines.append("| " + " | ".join(fmt(number(row[h]) if h in pcols and number(row[h]) is not None
                                           and not str(row[h]).lstrip("-").isdigit() else row.get(h))
                                       for h in head) + " |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    return rows


# ------------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ylabel(metric: str) -> str:
    m = STEP_RE.match(metric)
    if m:
        return f"{UNITS.get(m.group(3), m.group(3))}\n({m.group(1)}, {m.group(2)} sampling steps)"
    return UNITS.get(metric, metric)


def plot_metric_vs_params(runs, params, cols, folder: Path, swept: str) -> list[Path]:
    """One figure per swept parameter, one panel per metric; with several swept parameters, one line per
    combination of the others. Runs to which the parameter does not apply are left out of its figure."""
    plt = _plt()
    out = []
    every = runs
    for p in params:
        others = [q for q in params if q != p]
        runs = [r for r in every if param_value(r, p) is not None]
        values = [param_value(r, p) for r in runs]
        numeric = all(number(v) is not None for v in values)
        cats = sorted(set(values), key=lambda v: (number(v) is None, number(v) or 0, str(v)))
        xs = {v: (number(v) if numeric else cats.index(v)) for v in cats}
        groups: dict[str, list] = {}
        for r in runs:
            groups.setdefault(label(r, others) if others else "runs", []).append(r)
        scattered = others and all(len(g) == 1 for g in groups.values())  # a random/Bayesian search
        if scattered:
            groups = {"runs": list(runs)}
        ncol = min(3, len(cols))
        nrow = math.ceil(len(cols) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow), squeeze=False)
        for ax, metric in zip(axes.flat, cols):
            for name, rs in groups.items():
                pts = sorted((xs[param_value(r, p)], r.data.metrics[metric]) for r in rs if metric in r.data.metrics)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 and (numeric or others) and not scattered else "none",
                            label=name)
            if numeric and min(xs.values()) > 0 and max(xs.values()) / min(xs.values()) >= 20:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if not numeric:
                ax.set_xticks(range(len(cats)), [short(p, c).split("=", 1)[1] for c in cats], rotation=20)
            ax.set_xlabel(PARAM_UNITS.get(p, short(p)))
            ax.set_ylabel(ylabel(metric), fontsize=8)
            ax.set_title(metric, fontsize=9)
            ax.grid(alpha=0.3)
            if len(groups) > 1:
                ax.legend(fontsize=7)
            if scattered and len(groups) == 1:
                for r in runs:
                    if metric in r.data.metrics:
                        ax.annotate(r.data.tags.get("hydra.job.num", ""), (xs[param_value(r, p)],
                                    r.data.metrics[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for ax in list(axes.flat)[len(cols):]:
            ax.axis("off")
        note = (f"\n(each point one run, labelled with its job number; {', '.join(short(q) for q in others)} "
                "vary too)") if scattered else ""
        if len(runs) < len(every):
            note += f"\n({len(every) - len(runs)} runs to which {short(p)} does not apply are not shown)"
        fig.suptitle(f"final metrics against {short(p)} (sweep over {swept}){note}")
        fig.tight_layout()
        path = folder / f"metrics_vs_{short(p).replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def plot_loss_curves(client, runs, params, folder: Path, swept: str) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    steps: set[int] = set()
    for r in runs:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss"))
        if hist:
            ax.plot(*zip(*hist), marker="o" if len(hist) < 30 else None, markersize=4, label=label(r, params))
            steps |= {s for s, _ in hist}
    if not steps:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    if len(steps) <= 12:
        ax.set_xticks(sorted(steps))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step [optimiser steps]")
    ax.set_ylabel("train/loss [a.u., consistency distance]")
    note = "\n(one point per run: train/loss was logged at these steps only, see trainer.log_every)" \
        if len(steps) == 1 else ""
    ax.set_title(f"training loss, one line per run (sweep over {swept}){note}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = folder / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def by_steps(metrics: dict, model: str, family: str) -> list[tuple[int, float]]:
    pts = []
    for k, v in metrics.items():
        m = STEP_RE.match(k)
        if m and m.group(1) == model and m.group(3) == family:
            pts.append((int(m.group(2)), v))
    return sorted(pts)


def steps_lines(runs, params, family: str) -> dict[str, list[tuple[int, float]]]:
    """{a run's label (its swept params, e.g. `method=tcd`): [(steps, its student's `family` metric)]}, the lines
    of the steps chart."""
    return {label(r, params): pts for r in runs if (pts := by_steps(r.data.metrics, "student", family))}


def plot_steps_chart(runs, params, family: str, folder: Path, swept: str) -> Path | None:
    """The LCM paper's chart: the metric against the number of sampling steps, one line per run, with the
    teacher's DDIM at the same step counts dashed (one black line when it is the same for every run). A second
    panel shows the students alone, on their own y range, where runs that differ little can be told apart."""
    plt = _plt()
    students = [(r, by_steps(r.data.metrics, "student", family)) for r in runs]
    students = [(r, pts) for r, pts in students if pts]
    if not students:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    steps = sorted({s for _, pts in students for s, _ in pts})
    for ax in axes:
        for r, pts in students:  # (one line per run: `steps_lines`)
            ax.plot(*zip(*pts), marker="o", label=label(r, params))
    ax = axes[0]
    teachers = [by_steps(r.data.metrics, "teacher_ddim", family) for r, _ in students]
    teachers = [t for t in teachers if t]
    if teachers and all(t == teachers[0] for t in teachers):
        ax.plot(*zip(*teachers[0]), "k--", marker="s", label="teacher DDIM (baseline)")
    else:
        for (r, _), line in zip(students, list(ax.get_lines())):
            t = by_steps(r.data.metrics, "teacher_ddim", family)
            if t:
                ax.plot(*zip(*t), "--", color=line.get_color(), alpha=0.6, label=f"teacher DDIM ({label(r, params)})")
    for ax, title in zip(axes, (f"student {family} against sampling steps, teacher DDIM dashed",
                                "the students alone (own y range)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("sampling steps [count]")
        ax.set_ylabel(UNITS.get(family, family))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{family} against the number of sampling steps (sweep over {swept})")
    fig.tight_layout()
    path = folder / f"{family}_vs_steps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ main
def main(cfg) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..tracking.tracker import configure_http, default_uri, redact

    uri = cfg.tracking.uri or default_uri()
    experiment = cfg.experiment or cfg.tracking.experiment
    if not cfg.parent and not cfg.experiment and not cfg.filter:
        raise SystemExit("lcm-exp-report: give parent=<sweep parent run id>, or experiment=NAME [filter=\"...\"]")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise SystemExit(f"lcm-exp-report: no MLflow store at {uri}; run it where the sweep was started, or set "
                         "tracking.uri")
    configure_http(uri)
    client = MlflowClient(uri)  # read-only: creates no experiment

    try:
        runs, prun = find_runs(client, cfg.parent, experiment, cfg.filter or "")
    except MlflowException as e:
        raise SystemExit(f"lcm-exp-report: {e.message} (parent={cfg.parent}, filter={cfg.filter!r}; MLflow's "
                         "search syntax: https://mlflow.org/docs/latest/search-runs.html)") from None
    if not runs:
        raise SystemExit(f"lcm-exp-report: no runs found (parent={cfg.parent}, experiment={experiment!r}, "
                         f"filter={cfg.filter!r}) in {redact(uri)}")
    objective, direction = objective_of(runs, cfg.objective)
    runs = rank(runs, objective, direction)
    params = [p for p in swept_params(runs)]
    swept = ", ".join(short(p) for p in params) or "nothing"
    family = cfg.metric or (STEP_RE.match(objective).group(3) if STEP_RE.match(objective) else "psnr_to_ref")
    cols = metric_columns(runs, objective)

    name = (prun.info.run_id[:8] if prun else re.sub(r"\W+", "_", experiment)) + time.strftime("-%Y%m%d-%H%M%S")
    folder = Path(cfg.out or Path("reports") / name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    title = (f"{prun.info.run_name[:1].upper()}{prun.info.run_name[1:]} ({prun.info.run_id})" if prun
             else f"Experiment {experiment}") + \
        (f", filter `{cfg.filter}`" if cfg.filter else "")
    rows = write_table(runs, params, cols, objective, direction, folder, title)
    plot_cols = [c for c in cols if c == objective or c == "train/loss" or
                 (STEP_RE.match(c) and STEP_RE.match(c).group(3) == family)][:6]
    figs = plot_metric_vs_params(runs, params, plot_cols, folder, swept)
    figs += [p for p in (plot_loss_curves(client, runs, params, folder, swept),
                         plot_steps_chart(runs, params, family, folder, swept)) if p]

    print((folder / "table.md").read_text())
    if rows:
        best = runs[0]
        print(f"best: {label(best, params)}  {objective}={fmt(best.data.metrics.get(objective))} ({direction}), "
              f"run {best.info.run_id}")
    print("figures: " + ", ".join(p.name for p in figs))
    if prun is not None and cfg.log_to_parent:
        client.log_artifacts(prun.info.run_id, str(folder), "report")
        client.set_tag(prun.info.run_id, "lcm_exp.report", str(folder))
        print(f"logged to the parent run {prun.info.run_id} (artifacts report/)")
    print(folder, flush=True)  # the last line: the report folder
    return folder
