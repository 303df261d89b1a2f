"""Loading a training trajectory (the checkpoints Diff-In and TracIn sum over) and the weights at one checkpoint.

Two sources (``TrajectoryConfig``):

* a trajectory file, the JSON written by ``pruner train-proxy``::

      {"arch", "config_file", "optimizer", "seed", "total_steps", "pool_size", "lr_schedule": [lr per step],
       "checkpoints": [{"path" (relative to the file), "step", "lr", "lr_mean", "train_loss"}, ...]}

* a list of OpenCLIP training checkpoints (``open_clip_train`` format: ``{"epoch", "state_dict", "optimizer",
  ...}``, state dict keys with or without the DDP ``module.`` prefix). ``lr`` is read from the optimiser's
  ``param_groups[0]["lr"]``, i.e. the learning rate of the last update before the checkpoint; ``step`` is the
  checkpoint's ``step`` key (written by ``pruner train-proxy``), else its ``epoch``. Epochs measure training time
  only up to a global factor (steps per epoch): Diff-In's taylor form (a_t ∝ t·η_t² for every term) and TracIn are
  then off by that factor for every checkpoint, which leaves rankings unchanged; the exact_increment form is not
  (its second-order term weighs t·η against the first-order one), so it refuses such checkpoints
  (``pruner.scorer.checkpoint_weights``). ``lr_mean`` is unknown (None) for such lists. A list holding a single
  file may also name a bare state dict: a missing step/lr then defaults to 1 / 1.0 (``step_from`` "default"),
  a global constant for the same methods.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` (plus ``mmap=True`` when only
step/lr are needed): checkpoints may come from elsewhere and must never execute code. Errors name the file and the
fix. torch and open_clip are imported only where weights are read, so that reading a trajectory file (config
validation: pruner.config) stays cheap.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from pruner.io.atomic import write_json_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # absolute path
    step: int  # global optimiser step t (updates applied before this checkpoint)
    lr: float  # learning rate of the last update before the checkpoint ("in effect at step t")
    lr_mean: Optional[float]  # mean LR over the updates (previous checkpoint's step, step]; None if unknown
    step_from: str = field(default="step", compare=False)  # "step", "epoch" (OpenCLIP's, no step key), "default"

    def record(self) -> dict:
        """The checkpoint as an entry of a trajectory file (and of a job's trajectory.json)."""
        return {"path": self.path, "step": self.step, "lr": self.lr, "lr_mean": self.lr_mean}


@dataclass(frozen=True)
class Trajectory:
    checkpoints: tuple[CheckpointInfo, ...]  # ordered by step, strictly increasing
    arch: Optional[str] = None
    config_file: Optional[str] = None
    optimizer: Optional[str] = None
    seed: Optional[int] = None
    total_steps: Optional[int] = None
    pool_size: Optional[int] = None  # samples the proxy was trained on (N in a_t)
    lr_schedule: Optional[tuple[float, ...]] = None  # lr_schedule[i] = LR of update i + 1 (train-proxy only)


def existing_checkpoint(path: Union[str, Path]) -> Path:
    """``path`` as the loaders read it; raises FileNotFoundError naming it and the fix unless it is a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (fix: check trajectory.checkpoints / the paths "
                                f"in the trajectory file, which are relative to that file)")
    return path


def _torch_load(path: Union[str, Path], mmap: bool = False):
    import torch
    path = existing_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise ValueError(f"checkpoint {path} cannot be read as a weights-only torch file: {e} (fix: re-save it "
                         f"with torch.save({{'state_dict': model.state_dict(), ...}}), tensors and plain types only)"
                         ) from None


def _state_dict_of(obj, path) -> dict[str, torch.Tensor]:
    import torch
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} holds neither an OpenCLIP training checkpoint (a dict with "
                         f"'state_dict') nor a state dict of tensors (fix: point to the .pt files written by "
                         f"open_clip_train or `pruner train-proxy`)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def energy_weighted_step_scale(second_moments: Sequence[torch.Tensor], eps: float) -> float:
    """The factor by which Adam's update of a gradient exceeds the LR, given the second moments v_p of every element
    p (bias-corrected): sum_p v_p / (sqrt(v_p) + eps) / sum_p v_p. This is E[1 / (sqrt(v) + eps)] weighted by
    gradient energy v: the per-parameter step sizes eta / (sqrt(v_p) + eps) averaged where the gradients, and so the
    Gauss-Newton matrix's leading directions, are large. 1.0 when there is no gradient energy at all."""
    num = den = 0.0
    for v in second_moments:
        v = v.double()
        num += float((v / (v.sqrt() + eps)).sum())
        den += float(v.sum())
    return num / den if den > 0 else 1.0


def adam_step_scale(exp_avg_sq: Sequence[torch.Tensor], steps: Sequence[int], beta2: float, eps: float) -> float:
    """:func:`energy_weighted_step_scale` of Adam's stored second moments ``exp_avg_sq`` after ``steps`` updates,
    bias-corrected (``exp_avg_sq / (1 - beta2^step)``); tensors with no update yet are left out."""
    return energy_weighted_step_scale([v.double() / (1.0 - beta2 ** float(step))
                                       for v, step in zip(exp_avg_sq, steps) if step > 0], eps)


def optimizer_step_scale(path: str, params: Optional[Sequence[tuple[str, tuple]]] = None,
                         layers: Optional[set[str]] = None) -> tuple[Optional[float], str]:
    """By how much the optimiser's update of a gradient exceeded the learning rate when the checkpoint was saved, from
    its optimiser state (OpenCLIP checkpoints and train-proxy's carry it), and over which parameters: (scale, basis).

    For Adam(W) the gradient-energy weighted mean of 1 / (sqrt(v) + eps) over the second moments v
    (:func:`adam_step_scale`) of the parameters named in ``layers`` (basis "layers": the ones whose gradients
    Diff-In sketches; the embeddings' second moments are larger and would pull the scale down: benchmarks/RESULTS.md,
    "The default since stop 33"). The optimiser state lists tensors by position, so they are named by ``params``
    (the model's trainable parameters as (open_clip name, shape), in registration order) in the order OpenCLIP's
    trainer passes them (gains and biases first, then the rest) or in registration order, whichever every stored
    shape matches; when neither does (another trainer) or ``layers`` is not given, every
    parameter (basis "all"). For SGD with momentum m, 1 / (1 - m) (the sum of the momentum's geometric series); 1.0
    for plain SGD (basis "sgd"). (None, "none") for a checkpoint without optimiser state (a bare state dict, a
    released model): Diff-In's propagated form then estimates it (pruner.scores.shared.estimated_step_scale). Read
    with ``weights_only`` and ``mmap``."""
    obj = _torch_load(path, mmap=True)
    opt = obj.get("optimizer") if isinstance(obj, dict) else None
    if not isinstance(opt, dict) or not opt.get("param_groups"):
        return None, "none"
    group = opt["param_groups"][0]
    state = opt.get("state") or {}
    ids = [i for g in opt["param_groups"] for i in g.get("params", [])]
    adam = [i for i in ids if isinstance(state.get(i), dict) and "exp_avg_sq" in state[i]]
    if adam:
        names = _state_names(ids, state, params) if params is not None and layers is not None else None
        stored = set(adam)
        keep = [i for i, n in zip(ids, names) if n in layers and i in stored] if names else []
        basis = "layers" if keep else "all"
        keep = keep or adam
        betas = group.get("betas", (0.9, 0.999))
        scale = adam_step_scale([state[i]["exp_avg_sq"] for i in keep], [int(state[i].get("step", 1)) for i in keep],
                                float(betas[1]), float(group.get("eps", 1e-8)))
        return scale, basis
    momentum = float(group.get("momentum") or 0.0)
    return (1.0 / (1.0 - momentum) if 0 < momentum < 1 else 1.0), "sgd"


def _state_names(ids: Sequence[int], state: dict, params: Sequence[tuple[str, tuple]]) -> Optional[list[str]]:
    """The parameter name of each optimiser position in ``ids``: the first candidate order of ``params`` (OpenCLIP's
    trainer: ``p.ndim < 2`` or a name with "bn", "ln", "bias" or "logit_scale" first, then the rest; registration
    order) whose shapes match every position that holds a second moment; None if none does."""
    def openclip_first(n: str, shape: tuple) -> bool:
        return len(shape) < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))
    candidates = [[p for p in params if openclip_first(*p)] + [p for p in params if not openclip_first(*p)],
                  list(params)]
    for order in candidates:
        if len(order) == len(ids) and all(
                tuple(state[i]["exp_avg_sq"].shape) == tuple(shape) for i, (_, shape) in zip(ids, order)
                if isinstance(state.get(i), dict) and "exp_avg_sq" in state[i]):
            return [n for n, _ in order]
    return None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state dict (open_clip parameter names, no ``module.`` prefix) of an OpenCLIP training checkpoint
    or a bare state dict file. Raises if any floating tensor holds NaN/Inf, naming the tensor."""
    sd = _state_dict_of(_torch_load(path), path)
    for name, t in sd.items():
        if t.is_floating_point() and not t.isfinite().all():
            raise ValueError(f"checkpoint {path}: tensor {name!r} contains NaN/Inf values (fix: training diverged "
                             f"before this checkpoint; drop it from the trajectory or retrain with a lower LR)")
    return sd


def check_checkpoints(traj: Trajectory, arch: str, config_file: Optional[str] = None) -> list[str]:
    """One line per checkpoint of ``traj`` that a job could not score (:func:`check_checkpoint_files`). The pre-flight
    check of ``validate-config`` and ``pruner prune``, so that a bad checkpoint stops a job before any Ray work."""
    return check_checkpoint_files([ck.path for ck in traj.checkpoints], arch, config_file)


def check_checkpoint_files(paths: Sequence[str], arch: str, config_file: Optional[str] = None) -> list[str]:
    """One line per checkpoint file that cannot be loaded into ``arch``, naming the file and the fix: it cannot be
    read without executing code (``weights_only``: a pickle-bearing file is refused, never run), holds NaN/Inf
    weights, or does not fit the architecture (missing or unexpected tensors, other shapes). Reads every file's
    tensors once and builds the model once (no weights loaded into it); [] when all are fine."""
    from pruner.model.clip import create_clip
    try:
        model, _, _ = create_clip(arch, config_file)
    except (ValueError, RuntimeError, OSError) as e:
        return [f"model.arch {arch!r}: {e}"]
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for path in paths:
        try:
            sd = load_state_dict(path)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
        if missing or unexpected or shapes:
            what = "; ".join(f"{n} {v[:3]}{' ...' if len(v) > 3 else ''}" for n, v in
                             (("missing", missing), ("unexpected", unexpected),
                              ("other shapes", [f"{k} {tuple(sd[k].shape)} vs {want[k]}" for k in shapes])) if v)
            problems.append(f"checkpoint {path} does not fit model.arch {arch!r}: {what} (fix: set model.arch "
                            f"(and model.config_file) to the architecture the checkpoint was trained with; "
                            f"train-proxy records it in trajectory.json)")
    return problems


def _check_increasing(infos: list[CheckpointInfo], source: str) -> None:
    for a, b in zip(infos, infos[1:]):
        if b.step <= a.step:
            raise ValueError(f"{source}: steps must increase strictly, but {b.path} (step {b.step}) follows "
                             f"{a.path} (step {a.step}) (fix: list the checkpoints of one run in training order)")


def _from_file(file: str) -> Trajectory:
    p = Path(file).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"trajectory file {p} does not exist (fix: run `pruner train-proxy` or point "
                                f"trajectory.file to an existing trajectory.json)")
    try:
        d = json.loads(p.read_text())
        infos = [CheckpointInfo(path=str((p.parent / c["path"]).resolve()), step=int(c["step"]),
                                lr=float(c["lr"]), lr_mean=None if c.get("lr_mean") is None else float(c["lr_mean"]))
                 for c in d["checkpoints"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"trajectory file {p} is malformed ({type(e).__name__}: {e}) (fix: it must be JSON with "
                         f"'checkpoints': [{{'path', 'step', 'lr', 'lr_mean'}}, ...])") from None
    if not infos:
        raise ValueError(f"trajectory file {p} lists no checkpoints (fix: re-run `pruner train-proxy`)")
    for c in infos:
        if not Path(c.path).is_file():
            raise FileNotFoundError(f"trajectory file {p} names checkpoint {c.path}, which does not exist (fix: "
                                    f"keep the checkpoints beside the file as train-proxy wrote them)")
    _check_increasing(infos, f"trajectory file {p}")
    sched = d.get("lr_schedule")
    return Trajectory(checkpoints=tuple(infos), arch=d.get("arch"), config_file=d.get("config_file"),
                      optimizer=d.get("optimizer"), seed=d.get("seed"), total_steps=d.get("total_steps"),
                      pool_size=d.get("pool_size"), lr_schedule=tuple(sched) if sched else None)


def _from_checkpoints(paths: list[str]) -> Trajectory:
    infos = []
    for path in paths:
        path = str(Path(path).resolve())
        obj = _torch_load(path, mmap=True)  # metadata only: mmap avoids reading the tensors
        _state_dict_of(obj, path)
        meta = obj if "state_dict" in obj else {}
        step = meta.get("step", meta.get("epoch"))
        step_from = "step" if "step" in meta else "epoch" if step is not None else "default"
        groups = (meta.get("optimizer") or {}).get("param_groups") or [{}]
        lr = groups[0].get("lr")
        if step is None or lr is None:
            if len(paths) > 1:
                raise ValueError(f"checkpoint {path} records no {'step/epoch' if step is None else 'optimizer LR'}, "
                                 f"so its weight in the trajectory is unknown (fix: use OpenCLIP training "
                                 f"checkpoints, or write a trajectory file listing path/step/lr for these files)")
            step, lr, step_from = 1 if step is None else step, 1.0 if lr is None else lr, "default"
        infos.append(CheckpointInfo(path=path, step=int(step), lr=float(lr), lr_mean=None, step_from=step_from))
    if not infos:
        raise ValueError("trajectory.checkpoints is empty (fix: list at least one checkpoint file)")
    _check_increasing(infos, "trajectory.checkpoints")
    return Trajectory(checkpoints=tuple(infos))


def save_trajectory(traj: Trajectory, file: Union[str, Path]) -> Path:
    """Write ``traj`` as a trajectory file (absolute checkpoint paths; the fields it has) that :func:`load_trajectory`
    reads back as ``traj``, atomically. Returns the path."""
    meta = {k: v for k, v in asdict(traj).items() if k != "checkpoints" and v is not None}
    write_json_atomic(file, {**meta, "checkpoints": [c.record() for c in traj.checkpoints]})
    return Path(file)


def load_trajectory(file: Optional[str] = None, checkpoints: Optional[list[str]] = None) -> Trajectory:
    """Read a trajectory from a train-proxy trajectory file or from a list of checkpoint files (exactly one)."""
    if (file is None) == (not checkpoints):
        raise ValueError("give a trajectory file or a list of checkpoints, exactly one of them")
    return _from_file(file) if file is not None else _from_checkpoints(list(checkpoints))


def load_scoring_model(ckpt: Union[CheckpointInfo, str], arch: str, config_file: Optional[str] = None,
                       device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The linearised open_clip model (see :func:`pruner.model.clip.linearize_clip`) with the checkpoint's weights,
    in eval mode, float32, on ``device`` ("auto": CUDA when available)."""
    import torch

    from pruner.model.clip import create_clip, linearize_clip, load_open_clip_state
    path = ckpt.path if isinstance(ckpt, CheckpointInfo) else str(ckpt)
    sd = load_state_dict(path)
    model, _, _ = create_clip(arch, config_file)
    try:
        load_open_clip_state(model, sd)
    except (ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())[:500]  # one line; torch lists every mismatched tensor
        raise ValueError(f"checkpoint {path} does not fit model.arch {arch!r}: {why} (fix: set "
                         f"model.arch (and model.config_file) to the architecture the checkpoint was trained "
                         f"with; train-proxy records it in trajectory.json)") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return linearize_clip(model).eval().float().to(device)
