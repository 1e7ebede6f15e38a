"""Test-wide settings: no hub access, wandb offline, deterministic CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import torch  # noqa: E402

# One intra-op thread: on a 2-core machine, tiny models run many times slower when torch's threads
# compete with each other (or with a second process), and one thread makes CPU timings repeatable.
torch.set_num_threads(1)
