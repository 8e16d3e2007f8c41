"""distill: turn a big teacher model into a small offline student for one task."""

import os

# oneDNN, which runs PyTorch's bf16 matmuls on CPUs, keeps a compiled primitive for every matmul shape it
# meets (1,024 by default), each holding megabytes. Training batches change width every step, so each step
# adds new ones: RSS grew ~25 MB a step in `distill train` (SmolLM2-135M, batch 4 × ≤256 tokens; measured
# 3.4 → 4.9 GB over 24 steps, against 3.6 GB flat with one repeated batch). One step meets about a dozen
# shapes across all its layers, so 16 keeps a step's own shapes at no measured cost in speed (53 s against
# 49-54 s for 24 steps). oneDNN reads the variable when it builds its first primitive, hence here, before
# any model runs; a value the user set wins. No public PyTorch API sets this capacity.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

__version__ = "0.1.0"
