"""`export.register=NAME` (issue 18, item 2): real runs register a pyfunc version; `models:/NAME/N` loads and
predicts images equal to the export sampled with diffusers directly; `mlflow models serve` answers a REST
request with the same images; the LoRA case carries its base model."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.max_steps=2", "trainer.batch_size=2", "tracking.validation_steps=[1]",
        "tracking.system_metrics=false", "guidance.w_min=3", "guidance.w_max=9"]
PROMPTS = ["a large red circle in the center on a white background", "a small blue square in the top left"]


def env(cwd):
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{Path(cwd) / 'mlflow.db'}",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def train(args, cwd, cache):
    p = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import train; train()", *args,
                        f"teacher.cache_dir={cache}", f"data.cache_dir={cache}"], cwd=cwd, env=env(cwd),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lcm_exp_cache")


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def decode(images) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in images])


def diffusers_images(pipe, steps, guidance, seed=0, size=32) -> np.ndarray:
    import torch

    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
               generator=[torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS], output_type="pil").images
    return np.stack([np.asarray(im) for im in out])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_post(model_uri: str, cwd: Path, payload: dict, wait_s: float = 120) -> dict:
    """`mlflow models serve` on 127.0.0.1 (local env manager: nothing installed, nothing downloaded), one POST."""
    port = free_port()
    log = open(cwd / "serve.log", "w")
    # (the server computes with this process's thread count: a CPU's sums round by how they are split)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], cwd=cwd, stdout=log,
                            env={**env(cwd), "OMP_NUM_THREADS": str(torch.get_num_threads())},
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + wait_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, (cwd / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not start: " + (cwd / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_full_student_registered_predicts_and_serves(tmp_path, cache, store):
    import mlflow
    import pandas as pd
    from diffusers import DiffusionPipeline
    from mlflow.tracking import MlflowClient

    out = train([*TINY, "export.register=tiny-lcm"], tmp_path, cache)
    assert "lcm-exp: registered model: models:/tiny-lcm/1" in out
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    mv = client.get_model_version("tiny-lcm", "1")
    assert mv.run_id == run.info.run_id and mv.tags["lcm_exp.kind"] == "full"
    assert run.data.tags["lcm_exp.registered_model"] == "tiny-lcm/1"

    model = mlflow.pyfunc.load_model("models:/tiny-lcm/1")
    meta = model.metadata
    assert [c.name for c in meta.get_input_schema().inputs] == ["prompt"]
    defaults = {p.name: p.default for p in meta.get_params_schema().params}
    assert defaults == {"num_inference_steps": 4, "guidance_scale": 7.0, "seed": 0, "height": 32, "width": 32}
    local = mlflow.artifacts.download_artifacts("models:/tiny-lcm/1", dst_path=str(tmp_path / "dl"))
    example = mlflow.models.Model.load(local).load_input_example(local)  # the input example travels along
    assert example["prompt"].tolist() and all(isinstance(p, str) for p in example["prompt"])

    got = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"num_inference_steps": 2})
    assert list(got.columns) == ["prompt", "image"] and got["prompt"].tolist() == PROMPTS
    images = decode(got["image"])
    assert images.shape == (2, 32, 32, 3) and images.std() > 0
    # the independent reference: the exported pipeline folder sampled with diffusers, same seed and params
    export = Path(run.data.tags["lcm_exp.output_dir"]) / "export"
    pipe = DiffusionPipeline.from_pretrained(export)
    assert np.array_equal(images, diffusers_images(pipe, steps=2, guidance=7.0))
    other = decode(model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"num_inference_steps": 2, "seed": 1})
                   ["image"])
    assert not np.array_equal(images, other)

    # an image depends on its prompt and the seed, not on the rest of the batch
    # (to one 8-bit level: a CPU's batched matmuls round by the batch's size; another seed moves it far more)
    alone = decode(model.predict(pd.DataFrame({"prompt": PROMPTS[1:]}), params={"num_inference_steps": 2})["image"])
    diff = np.abs(alone[0].astype(int) - images[1].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert np.abs(other[1].astype(int) - images[1].astype(int)).mean() > 1

    # the REST server answers the same request with the same images
    resp = serve_and_post("models:/tiny-lcm/1", tmp_path, {"dataframe_records": [{"prompt": p} for p in PROMPTS],
                                                            "params": {"num_inference_steps": 2}})
    served = resp["predictions"]
    assert [r["prompt"] for r in served] == PROMPTS
    assert np.array_equal(decode([r["image"] for r in served]), images)


def test_lora_students_register_as_versions_with_their_base(tmp_path, cache, store):
    import mlflow
    import pandas as pd
    from diffusers import DiffusionPipeline, LCMScheduler
    from mlflow.tracking import MlflowClient

    train(["-m", *TINY, "student=lora", "trainer.seed=0,1", "export.register=tiny-lcm-lora"], tmp_path, cache)
    client = MlflowClient(store)
    versions = client.search_model_versions("name='tiny-lcm-lora'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    v2 = client.get_model_version("tiny-lcm-lora", "2")
    run = client.get_run(v2.run_id)
    assert v2.tags["lcm_exp.kind"] == "lora" and run.data.params["student"] == "lora"

    model = mlflow.pyfunc.load_model("models:/tiny-lcm-lora/2")
    defaults = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert defaults["guidance_scale"] == 1.0  # LCM-LoRA samples without guidance
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-lcm-lora/2", dst_path=str(tmp_path / "dl")))
    base_dir = mlflow.models.Model.load(str(local)).flavors["python_function"]["artifacts"]["base"]["path"]
    assert (local / base_dir / "model_index.json").is_file()  # the base pipeline travels along
    images = decode(model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"num_inference_steps": 2})["image"])
    assert images.shape == (2, 32, 32, 3)

    export = Path(run.data.tags["lcm_exp.output_dir"]) / "export"
    info = json.loads((export / "lcm_exp_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(info["base_model"])
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    base = diffusers_images(pipe, steps=2, guidance=1.0)
    pipe.load_lora_weights(export)
    assert np.array_equal(images, diffusers_images(pipe, steps=2, guidance=1.0))
    assert not np.array_equal(images, base)  # the adapters are in the served model
