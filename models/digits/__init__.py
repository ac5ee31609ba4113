"""A small real-data detail-perception study: handwritten-digit grids (scikit-learn's
``load_digits``), questions needing local detail, counting and spatial relations, a tiny MLLM
trained from scratch with each projector at the same visual-token budget.

    python -m models.digits.run --profile cpu --out benchmarks/results/digits_cpu

Submodules (import them explicitly; this package imports nothing heavy):
``dataset`` (the builder), ``run`` (the study), ``relevance`` (R-GAE-style relevance maps).
"""
