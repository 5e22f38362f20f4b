"""Rewards: pure functions of a question record and what a program produced, each a value with named parts.

* ``decomposition``: plan quality (format, structure, placeholder use, retrieval-grounded executability,
  agreement with a gold decomposition), after APEX-Searcher and OPERA; scores raw planner completions too.
* ``frozen_generator``: EM of a frozen LM's answer from the collected documents + 0.5 * answer Hit
  (QAgent, stage 2).
* ``answer_em`` / ``answer_f1``: the program's own answer (QAgent, stage 1).

``REWARDS[name]`` (or :func:`get_reward`) gives each one as ``reward(question, output, **options)``.
"""

from apexdsp.rewards.answer import answer_em_reward, answer_f1_reward, answer_reward
from apexdsp.rewards.base import REWARDS, RewardFn, RewardResult, get_reward, register_reward, weighted_mean
from apexdsp.rewards.decomposition import (DecompositionWeights, decomposition_reward,
                                           decomposition_reward_from_trajectory, decomposition_rewards)
from apexdsp.rewards.frozen_generator import (FrozenGenerator, frozen_generator_reward, frozen_generator_score,
                                              score_trajectory_with_frozen_generator)

__all__ = [
    "REWARDS", "RewardFn", "RewardResult", "get_reward", "register_reward", "weighted_mean",
    "DecompositionWeights", "decomposition_reward", "decomposition_reward_from_trajectory", "decomposition_rewards",
    "FrozenGenerator", "frozen_generator_reward", "frozen_generator_score", "score_trajectory_with_frozen_generator",
    "answer_reward", "answer_em_reward", "answer_f1_reward",
]
