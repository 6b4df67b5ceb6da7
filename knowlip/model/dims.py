"""Model sizes. `tiny` is for tests and the quickstart (a training step well under a second on one CPU core);
`base` is the paper's ViT-B/16 + BERT-base; `large` pairs ViT-L/16 with BERT-base (as BLIP-large does)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from knowlip.choices import MODEL_SIZES


@dataclass(frozen=True)
class VisionDims:
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224  # what the position embeddings are built for; other sizes are interpolated
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate over the blocks (BLIP: 0.1 for large)


@dataclass(frozen=True)
class TextDims:
    dim: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout (BLIP keeps it in pretraining)


@dataclass(frozen=True)
class ModelDims:
    vision: VisionDims
    text: TextDims
    embed_dim: int = 256  # the shared ITC space
    queue_size: int = 57_600


PRESETS: dict[str, ModelDims] = dict(zip(MODEL_SIZES, (
    ModelDims(VisionDims(patch=8, dim=64, depth=2, heads=2, image_size=64),  # tiny
              TextDims(dim=64, layers=2, heads=2, intermediate=128, max_positions=256), embed_dim=32, queue_size=256),
    ModelDims(VisionDims(), TextDims()),  # base
    ModelDims(VisionDims(dim=1024, depth=24, heads=16, drop_path=0.1), TextDims()),  # large
), strict=True))


def preset(name: str, image_size: int | None = None, queue_size: int | None = None, text_dropout: float | None = None,
           drop_path: float | None = None) -> ModelDims:
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; expected one of {', '.join(PRESETS)}")
    dims = PRESETS[name]
    if image_size:
        dims = replace(dims, vision=replace(dims.vision, image_size=image_size))
    if queue_size is not None:
        dims = replace(dims, queue_size=queue_size)
    if text_dropout is not None:
        dims = replace(dims, text=replace(dims.text, dropout=text_dropout))
    if drop_path is not None:
        dims = replace(dims, vision=replace(dims.vision, drop_path=drop_path))
    return dims
