"""The MLflow pyfunc model of a registered export: prompts in, images out (MLflow "models from code").

`lcm_exp.export.registry` saves this file itself into the model, so loading and serving the model need diffusers,
torch, pandas and Pillow, not lcm_exp; nothing is pickled. The model's artifacts are the export folder
(`export`: a diffusers pipeline folder, or LoRA weights + `scheduler/`) and, for LoRA on a local base model,
that base pipeline folder (`base`); `model_config` holds the defaults.

Input: a DataFrame with a string column `prompt` (or a dict `{"prompt": [...]}`). Params (the student's defaults):
`num_inference_steps`, `guidance_scale` (a diffusers guidance scale, LCM's w + 1; 1.0 = no guidance for
LCM-LoRA), `seed` (each image depends on its prompt and the seed only), `height`, `width`. Output: a DataFrame with `prompt` and `image`, a base64-encoded PNG.
"""
import base64
import io

import mlflow.models
import mlflow.pyfunc
import pandas as pd

PARAMS = ("num_inference_steps", "guidance_scale", "seed", "height", "width")


class LCMImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import diffusers
        import torch
        from diffusers import DiffusionPipeline

        _quiet()

        self.config = dict(context.model_config or {})
        export = context.artifacts["export"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.config.get("needs_base", self.config.get("kind") == "lora"):  # (kind: versions saved before)
            base = context.artifacts.get("base") or self.config["base_model"]
            pipe = DiffusionPipeline.from_pretrained(base)
            scheduler = getattr(diffusers, self.config.get("scheduler") or "LCMScheduler")  # (the method's)
            pipe.scheduler = scheduler.from_pretrained(export, subfolder="scheduler")
            pipe.load_lora_weights(export)
        else:
            pipe = DiffusionPipeline.from_pretrained(export)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    # (the DataFrame hint: MLflow's signature, not a type hint, describes the input)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        prompts = _prompts(model_input)
        p = {k: self.config.get(k) for k in PARAMS}
        p.update({k: v for k, v in (params or {}).items() if k in PARAMS and v is not None})
        # one generator per prompt, all seeded alike: an image depends on its prompt and the seed, not on the batch
        generator = [torch.Generator(self.device).manual_seed(int(p["seed"] or 0)) for _ in prompts]
        steps = int(p["num_inference_steps"])
        method = (self.config.get("pipeline_arguments") or {}).get(str(steps), {})  # (TCD's eta, PCM's timesteps)
        images = self.pipe(prompts, num_inference_steps=steps, guidance_scale=float(p["guidance_scale"]),
                           height=int(p["height"]), width=int(p["width"]), generator=generator, output_type="pil",
                           **method).images
        return pd.DataFrame({"prompt": prompts, "image": [_png_base64(im) for im in images]})


def _quiet() -> None:
    """lcm_exp's filters of messages nobody can act on, where lcm_exp is installed (it need not be)."""
    try:
        from lcm_exp import quiet
    except ImportError:
        return
    quiet.install()


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a DataFrame (what the REST server and a signature give)
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [str(x) for x in (value if isinstance(value, (list, tuple)) else [value])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in model_input]


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


mlflow.models.set_model(LCMImageModel())
