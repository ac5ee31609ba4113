"""A small real-data detail-perception study: handwritten-digit grids (scikit-learn's
``load_digits``) at random sub-cell offsets that no projector window lines up with, questions that
need local detail, a tiny MLLM per projector on a frozen pretrained tower, rate sweep and seeds.

    python -m models.digits.run --profile cpu                     # `make run`
    nice -n 10 python -m models.digits.run --profile cpu-study --out benchmarks/results/digits_cpu_study

Submodules (import them explicitly; this package imports nothing heavy): ``dataset`` (the
builder), ``tower`` (tower pretraining + freezing), ``run`` (the study; ``train_mllm`` is its one
call into the MLLM trainer), ``relevance`` (R-GAE-style relevance maps).
"""
