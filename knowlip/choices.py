"""Allowed values shared by the config and the code that acts on them, each defined once here (torch-free, so
that config.py can check a value before anything heavy is imported)."""

MODEL_SIZES = ("tiny", "base", "large")  # knowlip.model.dims.PRESETS
ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "reference")  # knowlip.model.attention
SAR_PRODUCTS = ("intensity", "amplitude", "db", "complex", "dn")  # knowlip.sar.geotiff, knowlip.ops.sar_norm
# The eight clauses of a structured caption, in caption order (knowlip.text.caption).
CAPTION_FIELDS = ("terrain", "functionality", "distribution", "layout", "boundary", "buildings", "roads", "water")
EXPORT_DTYPES = ("fp32", "bf16")  # knowlip.train.export
