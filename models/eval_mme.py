"""Entry point ``python -m models.eval_mme`` (the code lives in :mod:`models.mllm.eval_mme`)."""
from .mllm.eval_mme import *  # noqa: F401,F403
from .mllm.eval_mme import main

if __name__ == "__main__":
    main()
