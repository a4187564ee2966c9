"""Helper of tests/test_ppo.py: one RL stage run (under torchrun or alone) whose replies are a fixed function of
the prompt, so runs with different numbers of processes see the same rollouts and must learn the same thing.

    python tests/rl_sharded_run.py '{"model_name_or_path": …}'   (or under torchrun --nproc_per_node N)
"""

from __future__ import annotations

import json
import sys

import medgpt.rl.recipe as recipe
from medgpt.config import build_config
from medgpt.stages import get_stage


class FixedReplies:
    """Four tokens made from the prompt's ids: the same reply to the same prompt in every process layout."""

    def generate_ids(self, prompts, params):
        return [[(sum(p) * (k + 3) + 7 * k * k) % 4000 + 100 for k in range(4)] for p in prompts]

    def sync(self, policy, step):
        return None


def main() -> int:
    options = json.loads(sys.argv[1])
    recipe.rollout_backend = lambda *args, **kwargs: FixedReplies()
    stage = get_stage(options.pop("stage", "ppo"))
    stage.run(build_config(stage, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
