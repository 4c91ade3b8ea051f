"""Every user-caused error is a short message that says what to do, not a traceback (exit 2 for configuration
errors); inputs we accept are accepted. Each row is a real `lcm-exp` process. docs/bad-inputs.md shows what
each prints in full."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from jobs import TINY, lcm_exp

pytestmark = pytest.mark.slow


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shards captioned `.text` (as some LAION copies are), shards with no caption at all, a teacher folder
    without its VAE, and a checkpoint of another configuration."""
    root = tmp_path_factory.mktemp("inputs")
    for name, key in (("text", "text"), ("nocaption", None)):
        (root / name).mkdir()
        with wds.TarWriter(str(root / name / "shard-00000.tar")) as w:
            for i in range(8):
                sample = {"__key__": f"{i:04d}", "png": png(), "json": json.dumps({"width": 40}).encode()}
                if key:
                    sample[key] = f"a gray square number {i}"
                w.write(sample)
    (root / "img2dataset").mkdir()
    with wds.TarWriter(str(root / "img2dataset" / "shard-00000.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"{i:09d}", "jpg": png(), "txt": f"a gray square number {i}", "json": json.dumps(
                {"url": f"http://example.com/{i}.jpg", "caption": "a gray square", "original_width": 40,
                 "original_height": 40, "status": "success"}).encode()})
    from lcm_exp.teachers.tiny_layouts import build

    sd15 = build("sd15", root / "sd15")
    shutil.copytree(sd15, root / "novae")
    shutil.rmtree(root / "novae" / "vae")
    other = root / "other"
    other.mkdir()
    lcm_exp([*TINY, "trainer.max_steps=1", "trainer.checkpoint_every=1", "skip.k=20"], other)
    (ckpt,) = other.glob("outputs/*/*/checkpoints/checkpoint-1")
    return {"root": root, "sd15": sd15, "checkpoint": ckpt}


# (overrides, exit code, what the message must say); {root}, {checkpoint} filled in from `inputs`
CASES = [
    (["skip.k=2000"], 2, ["skip.k: 2000 is more than the teacher's 1000 training timesteps", "skip.k=20"]),
    (["+trainer.max_stpes=3"], 2, ["Unknown key trainer.max_stpes", "Did you mean trainer.max_steps?"]),
    (["+loss.huber=3"], 2, ["Unknown key loss.huber", "Did you mean loss.huber_c?"]),
    (["trainer.mixed_precision=fp16"], 2, ["fp16 needs a CUDA GPU", "trainer.mixed_precision=bf16"]),
    (["trainer.mixed_precision=fp8"], 2, ["trainer.mixed_precision: fp8", "one of no, fp16, bf16"]),
    (["teacher=sd15", "teacher.pretrained={root}/novae"], 2, ["not a complete diffusers pipeline folder",
                                                               "vae missing"]),
    (["teacher=sd15", "teacher.pretrained={root}/nowhere"], 2, ["no such folder"]),
    (["trainer.resume={checkpoint}", "skip.k=10"], 2, ["was trained with another configuration",
                                                        "skip.k: 20 -> 10", "trainer.resume_mismatch=continue"]),
    (["tracking.uri=http://127.0.0.1:9"], 2, ["Cannot reach the MLflow tracking store http://127.0.0.1:9",
                                              "tracking.enabled=false"]),
    # img2dataset's json has original_width/original_height and no aesthetic score: the filter rejects all
    (["data=webdataset", "data.urls={root}/img2dataset/shard-00000.tar", "data.resolution=32",
      "data.min_aesthetic=5", "data.num_workers=0"], 2,
     ["rejected every one of the first 1,000 samples read", "data.min_aesthetic=5.0: no aesthetic score in its json",
      "original_height, original_width"]),
    (["trainer.resume={root}/nowhere/checkpoint-3"], 2, ["no checkpoint there"]),
    (["data=webdataset"], 2, ["data.urls must be set", "/data/laion/{{00000..00099}}.tar"]),
    (["data=webdataset", "data.urls={root}/nocaption/shard-00000.tar", "data.resolution=32"], 2,
     ["none of the first 100 samples of data.urls could be read", "has no caption",
      "its fields: json, png", "expected one of txt, caption, text"]),
    (["guidance.w_min=9", "guidance.w_max=3"], 2, ["guidance.w_min: 9.0 > guidance.w_max=3.0"]),
    (["trainer.compile=true"], 2, ["trainer.compile=true on a CPU is refused", "wrong gradients"]),
    # accepted: `.text` captions (the diffusers scripts read text;txt;caption), and more loader workers than
    # cores (capped, one log line)
    (["data=webdataset", "data.urls={root}/text/shard-00000.tar", "data.resolution=32", "data.num_workers=64"], 0,
     ["data.num_workers=64 capped at"]),
]


@pytest.mark.parametrize("overrides,code,says", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input(tmp_path, inputs, overrides, code, says):
    args = [o.format(**inputs) for o in overrides]
    r = lcm_exp([*TINY, "trainer.max_steps=2", *args], tmp_path, expect=code)
    out = r.stdout + r.stderr
    for text in says:
        assert text.format(**inputs) in out, out[-3000:]
    if code == 2:  # one message, no traceback (MLflow may log its store's creation before it)
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        assert sum(line.startswith("lcm-exp: ") for line in lines) == 1 and lines[-1].startswith("lcm-exp: ")
