"""FLOPs per training sample (forward + backward), counted from the architecture, for the MFU meter.

Counted: every matrix multiply (linear layers, the patch convolution, attention scores and values, the LM
head, ITC similarity matrices), as torch's FlopCounterMode counts them. Not counted: norms, activations,
softmax, embeddings lookups. Attention over padded text is counted at full length (kernels compute it).
Backward is twice the forward of what is trained; the patch convolution's backward is one forward (its input
needs no gradient); the momentum encoders run forward only.
"""

from __future__ import annotations

import torch

from knowlip.model.dims import ModelDims

# Dense bf16 tensor-core peaks from the datasheets (FLOP/s), matched against the device name in this order.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def _linear(n_tokens: int, d_in: int, d_out: int) -> int:
    return 2 * n_tokens * d_in * d_out


def vision_forward_flops(dims: ModelDims, image_size: int, channels: int) -> tuple[int, int]:
    """(patch embedding, transformer blocks + projection) forward FLOPs for one image."""
    v = dims.vision
    patches = (image_size // v.patch) ** 2
    n = patches + 1
    hidden = int(v.dim * v.mlp_ratio)
    patch = _linear(patches, channels * v.patch * v.patch, v.dim)
    block = _linear(n, v.dim, 3 * v.dim) + _linear(n, v.dim, v.dim) + 4 * n * n * v.dim \
        + _linear(n, v.dim, hidden) + _linear(n, hidden, v.dim)
    return patch, v.depth * block + _linear(1, v.dim, dims.embed_dim)


def text_forward_flops(dims: ModelDims, text_len: int, mode: str, image_tokens: int = 0, vocab: int = 0) -> int:
    """Forward FLOPs of one caption through the text model in `mode` (text | multimodal | decoder)."""
    t, L = dims.text, text_len
    layer = 4 * _linear(L, t.dim, t.dim) + 4 * L * L * t.dim + _linear(L, t.dim, t.intermediate) \
        + _linear(L, t.intermediate, t.dim)
    if mode != "text":
        layer += 2 * _linear(L, t.dim, t.dim) + 2 * _linear(image_tokens, dims.vision.dim, t.dim) \
            + 4 * L * image_tokens * t.dim
    total = t.layers * layer
    if mode == "text":
        total += _linear(1, t.dim, dims.embed_dim)
    if mode == "multimodal":
        total += _linear(1, t.dim, 2)
    if mode == "decoder":
        total += _linear(L, t.dim, t.dim) + _linear(L, t.dim, vocab)
    return total


def training_flops_per_sample(dims: ModelDims, vocab: int, image_size: int, text_len: int, channels: int = 1,
                              global_batch: int = 1, queue_size: int | None = None, distill: bool = True) -> int:
    """Forward + backward FLOPs of one sample of a SAR-KnowLIP training step (ITC + ITM + reconstruction)."""
    queue = dims.queue_size if queue_size is None else queue_size
    image_tokens = (image_size // dims.vision.patch) ** 2 + 1
    patch, vision = vision_forward_flops(dims, image_size, channels)
    text = text_forward_flops(dims, text_len, "text")
    itm = 3 * text_forward_flops(dims, text_len, "multimodal", image_tokens)  # 1 positive + 2 negative pairs
    decoder = text_forward_flops(dims, text_len, "decoder", image_tokens, vocab)
    sims = 2 * _linear(1, dims.embed_dim, global_batch + queue)  # image->text and text->image rows
    trained = vision + text + itm + decoder + sims
    forward = patch + trained
    backward = patch + 2 * trained  # the patch convolution needs only its weight gradient
    momentum = patch + vision + text + (sims if distill else 0)  # forward only
    return forward + backward + momentum


def inference_flops_per_image(dims: ModelDims, image_size: int, channels: int = 1) -> int:
    patch, vision = vision_forward_flops(dims, image_size, channels)
    return patch + vision


def peak_flops(device: torch.device) -> float | None:
    """The spec bf16 peak of this GPU (None on CPU or an unknown card): the MFU denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS if k in name), None)
