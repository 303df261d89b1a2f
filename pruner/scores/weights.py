"""The weight of every checkpoint of a trajectory in the method scores: pure Python, no torch, so that a job's id
and directory are found without loading a model (pruner.jobs.jobdir)."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pruner.config import JobConfig
    from pruner.model.checkpoints import Trajectory


def diffin_coefficient(step: int, lr: float, updates: int, pool_size: int) -> float:
    """a_t = -t * eta_t^2 * Delta_t / N: Diff-In's second-order increment -(t eta_t^2 / N)(...) per update (methods
    §1.2), summed over the Delta_t updates the checkpoint stands for at their mean LR eta_t (``lr``). With m
    evenly spaced checkpoints, Delta_t = T/m for all: the official code's -t eta_t^2 / (N m) up to the constant T."""
    return -step * lr * lr * updates / pool_size


def first_order_coefficient(lr: float, updates: int, pool_size: int) -> float:
    """b_t = eta_t * Delta_t / N: the weight of the first-order increment <v_t, g_z(theta_t)> in Diff-In's
    ``exact_increment`` form, summed over the checkpoint's updates like a_t (pruner.scores.combine)."""
    return lr * updates / pool_size


class CheckpointWeights(NamedTuple):
    """The weights of one checkpoint in the method scores (pruner.scores.combine)."""

    step: int  # global training step t
    eta: float  # TracIn's eta_i: the LR summed over the checkpoint's updates (lr * updates)
    a_t: float  # Diff-In's second-order coefficient -t lr^2 updates / N
    b_t: float  # Diff-In's first-order coefficient lr updates / N (form exact_increment only)
    lr: float  # the per-update LR the weights use: the interval's mean LR, or the LR at the checkpoint
    updates: int  # Delta_t: the updates the checkpoint stands for, (previous checkpoint's step, step]


def checkpoint_weights(cfg: JobConfig, traj: Trajectory) -> list[CheckpointWeights]:
    """The weights of every checkpoint. Checkpoint t stands for the updates since the previous checkpoint
    (from step 0 for the first): Delta_t = step_t - step_{t-1}. Every method sums its per-update increment over
    them (TracIn: sum of the step sizes, Pruthi et al.; Diff-In: methods §1.2, where the official code's 1/m is
    Delta_t / T for evenly spaced checkpoints), so unevenly spaced checkpoints (train-proxy's random ones) are
    weighted by the updates they stand for; with even spacing all weights share the factor Delta and rankings
    equal the per-checkpoint-LR form's. The per-update LR is the interval's mean LR (methods §6) unless
    lr_weighting = at_checkpoint or the mean is unknown; epoch-numbered checkpoints count epochs as updates.
    N for a_t and b_t: trajectory.pool_size from the config, else the trajectory file's, else 1 (a global
    constant: rankings do not depend on it). Each checkpoint's weights depend only on it and its predecessor, so
    appending a checkpoint (``pruner rescore --add-checkpoint``) leaves the earlier ones' unchanged.
    Raises ValueError for a checkpoint at step 0 (it stands for no update) and for the exact_increment and
    propagated forms over checkpoints without a recorded step (see pruner.model.checkpoints)."""
    n = cfg.trajectory.pool_size or traj.pool_size or 1
    form = cfg.scores.diffin.form
    if "diffin" in cfg.scores.methods and form in ("exact_increment", "propagated"):
        for ck in traj.checkpoints:
            if ck.step_from != "step":
                why = ("weighs its second-order term by the step t against its first-order term" if form ==
                       "exact_increment" else "damps each interval by exp(-h K) with h the LR summed over the updates "
                       "the checkpoint stands for, which a scale of t changes")
                raise ValueError(f"checkpoint {ck.path} records no optimiser step (step {ck.step} is "
                                 f"{'its epoch' if ck.step_from == 'epoch' else 'a default'}), but Diff-In's "
                                 f"{form} form {why} (fix: list the checkpoints in a trajectory file with their "
                                 f"global steps and LRs, or set scores.diffin.form: taylor, where a common scale of "
                                 f"t cancels)")
    out, prev = [], 0
    for ck in traj.checkpoints:
        updates = ck.step - prev
        if updates <= 0:
            raise ValueError(f"checkpoint {ck.path} is at step {ck.step}: it stands for no optimiser update since "
                             f"the start of training, so every influence weight of it would be 0 (fix: drop the "
                             f"initialisation from the trajectory; a checkpoint stands for the updates since the "
                             f"previous one)")
        lr = float(ck.lr_mean if (cfg.scores.diffin.lr_weighting == "interval_mean" and ck.lr_mean) else ck.lr)
        out.append(CheckpointWeights(ck.step, lr * updates, diffin_coefficient(ck.step, lr, updates, n),
                                     first_order_coefficient(lr, updates, n), lr, updates))
        prev = ck.step
    return out
