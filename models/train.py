"""Entry point ``python -m models.train`` (the trainer lives in :mod:`models.mllm.train`)."""
from .mllm.train import *  # noqa: F401,F403
from .mllm.train import main

if __name__ == "__main__":
    main()
