"""What a job reports about Diff-In's step scales (pruner.scores.shared.CheckpointShared.step_scale and its source):
read from a saved shared state, and the warnings users should see in the run log and summary.json. No torch, so the
reduce step imports it without loading a model library."""
from __future__ import annotations


def step_scale_of(state: dict) -> tuple[float, str]:
    """(step scale, its source) of a :meth:`CheckpointShared.to_state` dict; a state an older pruner wrote has no
    source ("legacy")."""
    return float(state.get("step_scale", 1.0)), str(state.get("step_scale_source", "legacy"))


def step_scale_warnings(scales: list[dict], train_batch_size: int) -> list[str]:
    """What users should know about Diff-In's step scales, said where they look: the checkpoints whose scale was
    estimated (no optimiser state in the file; the estimate assumes Adam(W) and a batch size, and a guess far off
    moves the ranking), whose optimiser state could not be named (every parameter's second moments averaged), and
    states an older pruner wrote (averaged over every parameter, or 1 without optimiser state)."""
    def which(source: str) -> list[dict]:
        return [s for s in scales if s["source"] == source]

    def listed(rows: list[dict]) -> str:
        return ", ".join(f"{s['checkpoint']} ({s['step_scale']:.3g})" for s in rows)
    out = []
    if which("estimated"):
        out.append(f"{len(which('estimated'))} of the {len(scales)} checkpoints carry no optimiser state "
                   f"(checkpoints {listed(which('estimated'))}): Diff-In's step scale was estimated from minibatch "
                   f"gradients, assuming Adam(W) at batch size {train_batch_size}. Set scores.diffin.train_batch_size "
                   f"to the global batch size they were trained with (every device, times gradient accumulation), or "
                   f"score checkpoints that carry their optimiser state (OpenCLIP's and train-proxy's do)")
    if which("optimizer_all_parameters"):
        out.append(f"the optimiser state of checkpoints {listed(which('optimizer_all_parameters'))} could not be "
                   f"matched to the model's parameters (a trainer that orders them otherwise than OpenCLIP's), so "
                   f"Diff-In's step scale averages every parameter's second moments, not only the sketched layers'")
    if which("legacy"):
        out.append(f"checkpoints {listed(which('legacy'))} reuse shared states an older pruner wrote (the step scale "
                   f"over every parameter, or 1 without optimiser state); run the job again in a new output_dir for "
                   f"the current step scale")
    return out
