"""`export.register=NAME`: the run's export as a new version of NAME in the MLflow Model Registry, a pyfunc model
that turns prompts into images (`lcm_exp/pyfunc_model.py`), with its signature and an input example.

    mlflow.pyfunc.load_model("models:/NAME/1").predict(pd.DataFrame({"prompt": [...]}),
                                                      params={"num_inference_steps": 4})
    mlflow models serve -m models:/NAME/1 --env-manager local

The model holds the export folder; for LoRA also the base pipeline when it is a local folder (else it names the
hub id, which then has to be in the Hugging Face cache). It is saved next to the export, logged to the run as
the artifact `pyfunc_model` and registered from there.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
ARTIFACT = "pyfunc_model"
EXAMPLE_PROMPTS = ["a large red circle in the center on a white background",
                   "a small blue square in the top left on a black background"]
REQUIREMENTS = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "pillow", "pandas")


def defaults(student, objective: str, w: float, resolution: int) -> dict:
    """The student's sampling defaults: the eval objective's step count (else 4), `w` (the evaluation's) as a
    diffusers guidance scale (w + 1; 1.0 for a student without a w input, LCM-LoRA), the training resolution,
    seed 0."""
    m = re.match(r"^eval/student_(\d+)step/", str(objective))
    return {"num_inference_steps": int(m.group(1)) if m else 4, "seed": 0, "height": int(resolution),
            "width": int(resolution), "guidance_scale": student.guidance_scale(float(w))}


def signature(d: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("num_inference_steps", "integer", d["num_inference_steps"]),
                            ParamSpec("guidance_scale", "double", d["guidance_scale"]),
                            ParamSpec("seed", "integer", d["seed"]), ParamSpec("height", "integer", d["height"]),
                            ParamSpec("width", "integer", d["width"])]))


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    import mlflow

    return [f"mlflow=={mlflow.__version__}", *out]


def save(folder: Path, out: Path, teacher, student, config: dict) -> Path:
    """Writes the pyfunc model of the export `folder` into `out`."""
    import pandas as pd
    from mlflow.pyfunc import save_model

    artifacts = {"export": str(folder)}
    base = Path(str(teacher.path)).expanduser()
    if student.export_needs_base and base.is_dir():
        artifacts["base"] = str(base)
    import json

    info = json.loads((Path(folder) / "lcm_exp_export.json").read_text())
    config = {**config, "kind": student.kind, "needs_base": student.export_needs_base,
              "base_model": str(teacher.path), "teacher": teacher.name, "scheduler": info.get("scheduler"),
              "pipeline_arguments": info.get("pipeline_arguments", {})}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the copy of local files: no bar
    save_model(str(out), python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts=artifacts,
               model_config=config, signature=signature(config), pip_requirements=requirements(),
               input_example=pd.DataFrame({"prompt": EXAMPLE_PROMPTS}))
    return out


def register(name: str | None, folder: Path, teacher, student, tracker, sampling: dict, skip_k: int):
    """Saves, logs and registers the pyfunc model of the export `folder` as a new version of `name`
    (`export.register`); `sampling`: its `defaults`. Returns (name, version), or None when the run is not tracked
    or the registry refused (said in the log and the run's tag `lcm_exp.register_error`: the trained student and
    its export stay, and the run goes on to its evaluation). Nothing without a name."""
    if not name:
        return None
    if tracker.run_id is None or tracker.client is None:
        log.warning("export.register=%s: the run is not tracked (tracking.enabled=false); nothing registered", name)
        return None
    try:
        return _register(name, folder, teacher, student, tracker, sampling, skip_k)
    except Exception as e:  # noqa: BLE001
        log.error("export.register=%s failed: %s", name, e)
        tracker.set_tags({"lcm_exp.register_error": str(e)[:2000]})
        return None


def _register(name: str, folder: Path, teacher, student, tracker, sampling: dict, skip_k: int) -> tuple[str, str]:
    import shutil

    from mlflow.tracking import MlflowClient
    out = Path(folder).parent / ARTIFACT
    shutil.rmtree(out, ignore_errors=True)
    save(Path(folder), out, teacher, student, sampling)
    client = MlflowClient(tracker.uri)
    client.log_artifacts(tracker.run_id, str(out), ARTIFACT)  # now, not queued: the version points at it
    try:
        client.create_registered_model(name, description="lcm_exp distilled student: prompts in, images out "
                                                          "(pyfunc; column `image` is a base64 PNG)")
    except Exception as e:  # noqa: BLE001 - it exists already: a new version of it
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
            raise
    source = client.get_run(tracker.run_id).info.artifact_uri.rstrip("/") + "/" + ARTIFACT
    mv = client.create_model_version(name, source, run_id=tracker.run_id, tags={
        "lcm_exp.kind": student.kind, "lcm_exp.teacher": teacher.name, "lcm_exp.skip_k": str(skip_k)})
    tracker.set_tags({"lcm_exp.registered_model": f"{name}/{mv.version}"})
    log.info("registered %s version %s (models:/%s/%s)", name, mv.version, name, mv.version)
    print(f"lcm-exp: registered model: models:/{name}/{mv.version}", flush=True)
    return name, str(mv.version)
