"""DAPO's dynamic sampling: train only on prompt groups whose rewards differ.

A group whose G completions all got the same reward has advantage 0 on every row: it costs a
generation and teaches nothing (its only effect is to dilute token-mean normalisers). With
`dynamic_sampling` the trainer draws `prompts_per_step` more prompts at a time within the step
until it has found `prompts_per_step` informative groups or `max_sampling_rounds` generation
rounds have run, and trains on the first ones found, so every normaliser (token counts, batch
reward std) is that of the kept batch. A step that found too few fills up with uninformative
groups (advantage 0), as a plain step would have trained on them. Refills are whole steps' worth
of prompts so that the draws do not depend on the number of processes.

The functions here are the decisions, pure and rank-independent: the trainer passes them every
group's flag in global draw order, so every rank keeps the groups a single process would.
"""

from __future__ import annotations

import numpy as np

from ..algo.advantages import group_advantages


def informative_groups(total_rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[B] bool: the groups whose rewards differ (the same zero-std test as the advantages, so a
    kept group never has all-zero advantages)."""
    zero_std = group_advantages(np.asarray(total_rewards), group_size, scale="none").zero_std_mask
    return ~zero_std.reshape(-1, group_size)[:, 0]


def choose_groups(informative: np.ndarray, wanted: int) -> list[int]:
    """Indices of the `wanted` groups the step trains on, from all drawn groups in draw order:
    the earliest informative ones, filled up (when too few were found) with the earliest others,
    which have advantage 0, so the step holds as many groups as a plain one."""
    informative = np.asarray(informative, dtype=bool)
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    return sorted(int(g) for g in order[:wanted])


def local_groups(chosen: list[int], per_round: int, world_size: int, rank: int) -> list[int]:
    """This rank's indices (into its own drawn groups, in draw order) of the chosen global groups.

    Global group g was drawn in round g // per_round by rank (g % per_round) // share, as its
    group g % share of that round (the sampler gives each rank a contiguous slice)."""
    share = per_round // world_size
    return [(g // per_round) * share + g % share for g in chosen if (g % per_round) // share == rank]


def sampling_metrics(informative: np.ndarray, wanted: int) -> dict[str, float]:
    """The step's dynamic-sampling counts; frac_zero_std_groups is over every group drawn."""
    drawn, found = int(informative.size), int(informative.sum())
    return {
        "sampling/rounds": float(drawn // wanted),
        "sampling/prompts": float(drawn),
        "sampling/informative_groups": float(found),
        "sampling/kept_groups": float(min(found, wanted)),
        "frac_zero_std_groups": 1.0 - found / drawn,
    }
