"""A Vision Transformer in plain PyTorch, for checks and benchmarks: that a transformer exported to ONNX
runs through every engine and splits like any CNN (tests/test_vit.py, ``python -m benchmarks.vit``).

It is ViT as Dosovitskiy et al. wrote it (and timm's ``vit_base_patch16_224`` builds it): a Conv2d patch
embedding (kernel = stride = patch), a class token, a learned position embedding, ``depth`` pre-norm
encoder blocks (LayerNorm, multi-head self-attention, LayerNorm, MLP with exact GELU, each with its
residual), a final LayerNorm and a linear head on the class token. Weights are random (seeded); nothing
is downloaded. It needs torch (imported here, so ``import hetero`` does not import this module).

Every reshape leaves the batch alone (``flatten``, ``transpose``, ``unflatten`` of the other dimensions);
the one size read from a tensor is the batch that the class token is expanded to, which the exporter
keeps symbolic (a Shape op), so one export with a dynamic batch serves every batch size.

    from hetero.vit import vit, export_onnx
    export_onnx(vit("b16"), "vit-b16.onnx")   # batch dimension "N"
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["CONFIGS", "ViT", "ViTConfig", "describe", "export_onnx", "vit"]


@dataclass(frozen=True)
class ViTConfig:
    image: int = 224
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    classes: int = 1000

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's shape."""
        return (3, self.image, self.image)


CONFIGS = {
    "b16": ViTConfig(),  # ViT-B/16, 86.6 M parameters
    "tiny": ViTConfig(image=32, patch=16, dim=64, depth=2, heads=2, mlp=128, classes=10),  # for tests
}


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, softmax(q k^T / sqrt(d)) v per head, out projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))  # (B, T, D)


class Block(nn.Module):
    """A pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """``forward(images (B, 3, image, image)) -> logits (B, classes)``."""

    def __init__(self, config: ViTConfig = CONFIGS["b16"]):
        super().__init__()
        c = config
        if c.image % c.patch:
            raise ValueError(f"image {c.image} is not a multiple of patch {c.patch}")
        self.config = c
        tokens = (c.image // c.patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, c.dim, c.patch, stride=c.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, c.dim))
        self.blocks = nn.Sequential(*[Block(c.dim, c.heads, c.mlp) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(config: str | ViTConfig = "b16", seed: int = 0) -> ViT:
    """A ViT of `config` ("b16", "tiny" or a ViTConfig) with seeded random weights, in eval mode.

    The tokens, positions and weight matrices are drawn as timm initialises them (normal, std 0.02,
    truncated at 2 std); biases (std 0.02) and the LayerNorms' scales (1 + normal, std 0.1) and shifts
    (std 0.1) are random too, unlike timm's zeros and ones, so that no parameter is the identity a wrong
    broadcast or a dropped term would go unseen behind (and an exporter folds no equal constants together).
    """
    c = CONFIGS[config] if isinstance(config, str) else config
    generator = torch.Generator().manual_seed(seed)
    model = ViT(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            draw = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(draw * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(draw.clamp_(-2, 2) * 0.02)
    return model.eval()


def export_onnx(model: ViT, path: str | os.PathLike[str], opset: int = 18) -> str:
    """Write `model` to `path` as one ONNX file (weights inside) with input "x" of shape (N, 3, H, W) and
    output "y" of shape (N, classes), the batch dimension N dynamic; returns the path."""
    c = model.config
    example = torch.randn((2, *c.input_shape), generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, external_data=False, opset_version=opset,
                                input_names=["x"], output_names=["y"],
                                dynamic_shapes=({0: torch.export.Dim("N", min=1)},), verbose=False)
    program.save(os.fspath(path))
    return os.fspath(path)


def describe(config: ViTConfig) -> str:
    """One line of the config's sizes, e.g. "image 224, patch 16, dim 768, ..."."""
    return ", ".join(f"{k} {v}" for k, v in asdict(config).items())
