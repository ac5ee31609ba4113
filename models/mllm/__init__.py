"""The MLLM (vision tower -> projector -> causal LM) and its LLaVA-style training / evaluation.

``model`` (:class:`MLLM`), ``llava`` (LLaVA checkpoints in and out: ``MLLM.from_llava`` /
``save_llava``), ``conversation`` (templates and answer-only labels), ``data`` (LLaVA
JSON dataset + collator), ``train`` (the trainer, ``python -m models.train``), ``eval_mme``
(``python -m models.eval_mme``), ``configs/`` (DeepSpeed configs). transformers / peft are
imported lazily, inside the functions that need them.
"""
from .model import (MLLM, default_image_processor, ensure_image_token, load_image_processor,
                    load_llm, load_tokenizer, load_vision_tower, tiny_components,
                    word_level_tokenizer)

__all__ = ["MLLM", "default_image_processor", "ensure_image_token", "load_image_processor",
           "load_llm", "load_tokenizer", "load_vision_tower", "tiny_components",
           "word_level_tokenizer"]
