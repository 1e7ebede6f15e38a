"""Online RL of an editing policy against a reward model: GRPO or PPO, Ray actors, DeepSpeed learners.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launch/grpo_edit.py --config launch/configs/shapeedit.yaml key=value ...
    python launch/grpo_edit.py [--config FILE.yaml] [key=value ...]     # starts a local Ray on 127.0.0.1
    python launch/grpo_edit.py --config FILE.yaml [key=value ...] --plan    # placement and GPU memory; nothing starts

Under `ray job submit` the job joins the submitting cluster; alone, it starts a private local cluster
bound to loopback. The resolved config goes to <output_dir>/config.yaml; see rl/config.py for keys.
A GPU run (cluster.gpus_per_node > 0) is planned first (launch/plan.py, models on the meta device) and refused,
with exit status 2, when a GPU would not hold its actors; `--plan` prints the plan and exits (0 if it fits).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/grpo_edit.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# Ray rewrites a 127.0.0.1 node address to the machine's network address and then binds its servers to all
# interfaces; this (undocumented) switch keeps a local cluster on loopback. It only changes how localhost is
# resolved, so joining a real multi-node cluster is unaffected. Read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402

from reward.config import config_from_cli  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rl.loop import train  # noqa: E402
from rl.ray_actors import ray_actors  # noqa: E402


def runtime_env(environ: Mapping[str, str]) -> dict:
    """Ray's runtime_env for every actor: this repository on PYTHONPATH, wandb offline unless the user chose a
    mode, and HF_HUB_OFFLINE only when the user set it, so hub access (hub ids in policy.path) follows the
    user's environment. Nothing else is forwarded here (no tokens)."""
    env_vars = {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "WANDB_MODE": environ.get("WANDB_MODE", "offline"),
    }
    if "HF_HUB_OFFLINE" in environ:
        env_vars["HF_HUB_OFFLINE"] = environ["HF_HUB_OFFLINE"]
    return {"env_vars": env_vars}


def preflight(cfg: RLConfig, only_plan: bool) -> int | None:
    """The plan of a GPU run: printed with --plan (then the exit status), and a refusal (2) when it does not fit."""
    if not cfg.cluster.gpus_per_node:
        if only_plan:
            print(
                "a CPU run (cluster.gpus_per_node is 0): every actor takes one CPU bundle; there is no GPU memory to "
                "plan"
            )
            return 0
        return None
    from launch.plan import format_plan, make_plan

    plan = make_plan(cfg)
    if only_plan or not plan["fits"]:
        print(format_plan(plan, cfg), file=sys.stdout if plan["fits"] else sys.stderr)
    if not plan["fits"]:
        print("error: the plan does not fit; nothing was started", file=sys.stderr)
        return 2
    return 0 if only_plan else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only_plan = "--plan" in argv
    cfg = config_from_cli(RLConfig, [a for a in argv if a != "--plan"], __doc__)
    status = preflight(cfg, only_plan)
    if status is not None:
        return status
    env = runtime_env(os.environ)
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(
            address=cfg.cluster.address or None, runtime_env=env
        )  # the job's cluster (ray job submit sets RAY_ADDRESS)
    else:
        ray.init(  # a cluster of its own, even where this machine runs another (Ray would join the newest)
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            runtime_env=env,
            configure_logging=False,
        )
    try:
        print(json.dumps(train(cfg, ray_actors), indent=1))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
