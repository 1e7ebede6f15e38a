"""Test-wide settings: no hub access, wandb offline, deterministic CPU threads."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: on a 2-core machine, tiny models run many times slower when torch's threads
# compete with each other (or with a second process), and one thread makes CPU timings repeatable.
torch.set_num_threads(1)

# The modules whose tests take 30 s to 2 min each (Ray runs, DeepSpeed ranks, a policy build; `make test
# ARGS=--durations=25`) run first. xdist hands each worker consecutive tests and, near the end, two at a time: a
# 2-minute test collected late kept one worker busy alone while the other had finished (make test 10 min 46 s,
# 2026-12-07). Within a module the order is pytest's, so module fixtures are built once per worker as before.
SLOW_MODULES = (
    "tests/reward/test_jrm.py",
    "tests/rl/test_loop.py",
    "tests/rl/test_multinode.py",
    "tests/launch/test_benchmarks.py",
    "tests/launch/test_build_assets.py",
)


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parents[1]
    missing = [module for module in SLOW_MODULES if not (root / module).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW_MODULES names files that are not there: {missing}")
    rank = {module: i for i, module in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_MODULES)))
