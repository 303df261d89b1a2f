"""``pruner train-proxy``: train an open_clip model on a seeded random subset of the pool's shards, from
scratch or from pretrained weights, and save the checkpoint trajectory that Diff-In / TracIn sum over.

From pretrained weights (``pretrained``: an open_clip pretrained tag such as ``laion2b_s34b_b79k`` for ViT-B-32,
or a local checkpoint file, e.g. another run's ``step_*.pt``) the trajectory is a fine-tune on the pool: the
proxy already knows the domain, as the CLIP model a data team filters with does, and the checkpoints record how
training on this pool moves it (theta_0 is the pretrained model). open_clip loads a local file with
``torch.load(weights_only=True)``.

Training is OpenCLIP's own trainer, ``open_clip_train.main.main`` (WebDataset input, AdamW or a timm optimiser,
warm-up + cosine schedule, contrastive loss, AMP on GPU), run in-process with one "epoch" of ``steps`` updates
(``--train-num-samples = steps * batch_size``). pruner's bundled configs are registered with
``open_clip.add_model_config`` first. Three things are patched for the duration of the call (and restored):

1. ``open_clip_train.data.tar_file_expander`` gets ``eof_value=None`` where webdataset has that parameter: from
   0.2.96 on it yields an end-of-shard marker ``{}`` that open_clip_train 3.3's ``group_by_keys_nothrow`` cannot
   handle (``KeyError: 'fname'`` at the first shard boundary; open_clip issue #935, webdataset issue #384). pruner
   pins webdataset <= 0.2.86 (open_clip_torch's training extra), so that users' own OpenCLIP training on pruner's
   outputs works in the same environment; the patch keeps train-proxy working with a later webdataset too.
2. ``webdataset.shuffle`` gets an RNG seeded from ``seed``: open_clip_train's sample-shuffle buffer otherwise
   seeds itself from pid and time, so two runs with the same seed would see different batches.
3. ``open_clip_train.main.train_one_epoch`` is wrapped (:class:`_Recorder`): open_clip_train saves only at epoch
   ends, but the trajectory needs checkpoints at arbitrary (evenly spaced and/or random) steps. The wrapper
   hooks the per-step LR scheduler call, which happens before each update, to save the model after exactly
   ``step`` updates in open_clip's checkpoint format (plus a ``step`` key), record the LR of every update (the
   exact schedule, for the interval-mean LR weights of shared/methods.md §6) and log step / loss / s per step.
   open_clip_train's own end-of-run ``epoch_1.pt`` duplicates the last step checkpoint and is removed.

Output (``out_dir``)::

    trajectory.json                     read by pruner.model.checkpoints.load_trajectory
    train/checkpoints/step_XXXXXXXX.pt  OpenCLIP format: epoch, step, name, state_dict, optimizer (+ scaler)
    train/out.log, train/params.txt     open_clip_train's log and arguments

Determinism: on CPU with ``workers=0`` two runs with the same arguments give identical weights (tested). On GPU
open_clip_train enables cuDNN benchmark / TF32, so GPU runs are reproducible only approximately.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import logging
import random
import shutil
import tarfile
import time
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch

from pruner.io.atomic import atomic_path, write_json_atomic
from pruner.logs import PrunerProgress
from pruner.model.checkpoints import Trajectory, check_checkpoint_files, load_trajectory
from pruner.model.clip import register_configs

log = logging.getLogger(__name__)
RUN_NAME = "train"  # open_clip_train's --name: outputs go to <out_dir>/train/
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}  # what open_clip_train reads as the image ("jpg;png;jpeg;webp")


def expand_shards(shards: Sequence[str]) -> list[str]:
    """Local shard files from files, directories (their .tar/.tar.gz/.tgz files) and glob or brace patterns."""
    import braceexpand

    urls: list[str] = []
    for spec in shards:
        for s in braceexpand.braceexpand(spec):
            p = Path(s)
            if p.is_dir():
                urls += sorted(str(f) for f in p.iterdir() if f.name.endswith(_SHARD_SUFFIXES))
            elif any(c in s for c in "*?["):
                urls += sorted(glob.glob(s))
            elif p.is_file():
                urls.append(str(p))
            else:
                raise FileNotFoundError(f"shard {s} does not exist (fix: give shard files, folders or globs)")
    if not urls:
        raise FileNotFoundError(f"no .tar/.tar.gz shards found in {list(shards)} (fix: check --shards)")
    return [str(Path(u).resolve()) for u in urls]


def count_samples(urls: Sequence[str]) -> int:
    """Samples open_clip_train can train on (an image and a ``txt`` caption under one key), by streaming each tar."""
    from webdataset.tariterators import base_plus_ext

    n = 0
    for url in urls:
        exts: dict[str, set] = {}
        with tarfile.open(url, "r|*") as tar:
            for m in tar:
                key, ext = base_plus_ext(m.name) if m.isfile() else (None, None)
                if key is not None:
                    exts.setdefault(key, set()).add(ext.lower())
        n += sum(1 for e in exts.values() if "txt" in e and e & _IMAGE_EXTS)
    return n


def checkpoint_steps(total_steps: int, even: int = 3, random_count: int = 0, seed: int = 0,
                     explicit: Optional[Sequence[int]] = None) -> list[int]:
    """Steps to save at: ``explicit`` if given, else ``even`` evenly spaced steps ending at ``total_steps`` plus
    ``random_count`` distinct uniformly random steps in [1, total_steps) (seeded)."""
    if explicit:
        steps = set(int(s) for s in explicit)
    else:
        steps = {round(total_steps * i / even) for i in range(1, even + 1)}
        rest = sorted(set(range(1, total_steps)) - steps)
        steps |= set(random.Random(seed).sample(rest, min(random_count, len(rest))))
    bad = [s for s in steps if not 1 <= s <= total_steps]
    if bad or not steps:
        raise ValueError(f"checkpoint steps must lie in [1, {total_steps}] (got {sorted(bad) or 'none'}) "
                         f"(fix: adjust --checkpoint-steps / --checkpoints / --steps)")
    return sorted(steps)


class _Recorder:
    """Wraps ``open_clip_train.train.train_one_epoch``: records the LR of every update and the training loss,
    logs progress, and saves a checkpoint after each requested step (see module docstring, item 3)."""

    def __init__(self, save_steps: Sequence[int], total_steps: int, log_every: int):
        self.train_one_epoch = None  # the wrapped function, set by _open_clip_train_patched
        self.save_steps = set(save_steps)
        self.total_steps, self.log_every = total_steps, log_every
        self.lrs: list[float] = []  # lrs[i]: LR of update i + 1
        self.losses: list[float] = []  # losses[i]: training loss of update i + 1
        self.saved: list[dict] = []
        self._pending: list[torch.Tensor] = []  # losses not yet copied to the host (one sync per log line)
        self._t_log, self._step_log = time.perf_counter(), 0

    def _flush_losses(self) -> None:
        if self._pending:
            self.losses += torch.stack(self._pending).float().cpu().tolist()
            self._pending = []

    def _log(self, step: int) -> None:
        self._flush_losses()
        now = time.perf_counter()
        sps = (now - self._t_log) / max(step - self._step_log, 1)
        loss = sum(self.losses[self._step_log:step]) / max(step - self._step_log, 1)
        log.info(f"train-proxy step {step}/{self.total_steps} | loss {loss:.4f} | lr {self.lrs[-1]:.3g} | "
                 f"{sps:.3f} s/step | ETA {sps * (self.total_steps - step):.0f} s")
        self._t_log, self._step_log = now, step

    def _maybe_save(self, step: int, model, optimizer, scaler, data, args) -> None:
        if step not in self.save_steps:
            return
        self.save_steps.discard(step)
        self._flush_losses()
        ckpt = {"epoch": step // data["train"].dataloader.num_batches, "step": step, "name": args.name,
                "state_dict": getattr(model, "module", model).state_dict(), "optimizer": optimizer.state_dict()}
        if scaler is not None:
            ckpt["scaler"] = scaler.state_dict()
        path = Path(args.checkpoint_path) / f"step_{step:08d}.pt"
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
        prev = self.saved[-1]["step"] if self.saved else 0
        entry = {"path": str(path), "step": step, "lr": self.lrs[step - 1],
                 "lr_mean": sum(self.lrs[prev:step]) / (step - prev),
                 "train_loss": sum(self.losses[prev:step]) / (step - prev)}
        self.saved.append(entry)
        log.info(f"train-proxy saved {path.name}: lr {entry['lr']:.3g}, mean lr since step {prev} "
                 f"{entry['lr_mean']:.3g}, mean train loss since step {prev} {entry['train_loss']:.4f}")

    def __call__(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        def scheduler_hook(step):  # called once per update, before it: `step` updates are done
            if step and step % self.log_every == 0:
                self._log(step)
            self._maybe_save(step, model, optimizer, scaler, data, args)
            self.lrs.append(scheduler(step))
            return self.lrs[-1]

        def loss_hook(*a, **kw):
            out = loss(*a, **kw)
            self._pending.append(sum(out.values()).detach())
            return out

        self.train_one_epoch(model, data, loss_hook, epoch, optimizer, scaler, scheduler_hook, dist_model, args,
                             tb_writer=tb_writer)
        step = len(self.lrs)
        if step % self.log_every:
            self._log(step)
        self._maybe_save(step, model, optimizer, scaler, data, args)


@contextlib.contextmanager
def _open_clip_train_patched(recorder: _Recorder, seed: int):
    """Apply the patches of the module docstring for the duration of the block. open_clip_train's logging setup
    (root handlers to stderr and out.log, INFO on every logger) is confined to the block as well."""
    import open_clip_train.data as ocd
    import open_clip_train.main as ocm
    import webdataset as wds

    saved = (ocd.tar_file_expander, wds.shuffle, ocm.train_one_epoch, ocm.setup_logging)
    handlers = list(logging.root.handlers)
    levels = {n: logging.getLogger(n).level for n in list(logging.root.manager.loggerDict) + [""]}
    for h in handlers:  # open_clip_train adds its own stderr handler; avoid printing every line twice
        logging.root.removeHandler(h)
    rng = random.Random(seed)  # one stream, so a repeated pass over the shards is shuffled differently
    if "eof_value" in inspect.signature(saved[0]).parameters:  # webdataset >= 0.2.96 (pruner pins <= 0.2.86)
        ocd.tar_file_expander = functools.partial(saved[0], eof_value=None)
    wds.shuffle = lambda bufsize, initial: saved[1](bufsize, initial, rng=rng)
    recorder.train_one_epoch, ocm.train_one_epoch = saved[2], recorder
    ocm.setup_logging = functools.partial(_quiet_console, saved[3])
    try:
        yield ocm
    finally:
        ocd.tar_file_expander, wds.shuffle, ocm.train_one_epoch, ocm.setup_logging = saved
        for h in list(logging.root.handlers):
            logging.root.removeHandler(h)
            h.close()
        for h in handlers:
            logging.root.addHandler(h)
        for n in list(logging.root.manager.loggerDict) + [""]:
            logging.getLogger(n).setLevel(levels.get(n, logging.NOTSET))


def proxy_arch(arch: Optional[str], config_file: Optional[str]) -> str:
    """The architecture to train: open_clip names a custom config by its file name, so with ``config_file`` the arch
    is that name (``arch`` may be left out, and must match when given); else ``arch``, by default pruner-tiny."""
    if config_file is None:
        return arch or "pruner-tiny"
    stem = Path(config_file).stem
    if arch is not None and arch != stem:
        raise ValueError(f"--arch {arch} does not match --config-file {config_file}: open_clip names a config by its "
                         f"file name, so that file defines {stem!r} (fix: drop --arch, or name the file {arch}.json)")
    return stem


def pretrained_source(arch: str, pretrained: Optional[str], config_file: Optional[str] = None) -> Optional[str]:
    """``pretrained`` as open_clip_train takes it, checked before any training (open_clip would otherwise fail inside
    the run, or train weights that pruner's scoring model does not reproduce). In open_clip's own order:

    * an open_clip pretrained tag of ``arch`` (any case, ``-`` or ``_``), returned in open_clip's spelling. It must
      match what pruner scores with: pruner.model.clip.create_clip builds ``arch`` without pretrained weights, so with
      the architecture's activation and image preprocessing; a tag trained with the other activation (QuickGELU or
      not), or another mean, std, interpolation or resize mode, is refused (the scores would be taken on another
      model). SigLIP models are refused: train-proxy trains with the CLIP loss;
    * else a local checkpoint file that loads into ``arch`` (pruner.model.checkpoints.check_checkpoint_files: read
      with ``weights_only``, finite, the architecture's tensors and shapes), returned resolved.
    """
    if not pretrained:
        return None
    from open_clip.factory import get_model_config

    tag = pretrained.lower().replace("-", "_")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag in tags:
        model_cfg = get_model_config(arch) or {}
        problem = _tag_problem(arch, tag, model_cfg)
        if problem:
            fit = [t for t in tags if not _tag_problem(arch, t, model_cfg)]
            fix = f"another tag of {arch}: {fit}" if fit else "another --arch"
            if "QuickGELU" in problem:
                fix += f", or --arch {_other_gelu(arch)}"
            raise ValueError(f"--pretrained {tag}: {problem} (fix: {fix})")
        return tag
    if Path(pretrained).is_file():
        problems = check_checkpoint_files([pretrained], arch, config_file)
        if problems:
            raise ValueError(f"--pretrained: {problems[0]}")
        return str(Path(pretrained).resolve())
    raise ValueError(f"--pretrained {pretrained!r} is neither an open_clip pretrained tag of {arch} nor a file (fix: "
                     f"give a checkpoint file, e.g. another run's train/checkpoints/step_*.pt, or one of "
                     f"{tags or 'the tags open_clip.list_pretrained() lists for another arch'})")


def _tag_problem(arch: str, tag: str, model_cfg: dict) -> Optional[str]:
    """Why pruner's scoring model of ``arch`` would not reproduce the weights of ``tag`` (see pretrained_source), or
    None."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if "init_logit_bias" in model_cfg:
        return f"{arch} is a SigLIP model, and train-proxy trains with the CLIP loss"
    if bool(cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        return f"trained with{'' if cfg.get('quick_gelu') else 'out'} QuickGELU, unlike --arch {arch}"
    base = {**asdict(PreprocessCfg()), **model_cfg.get("preprocess_cfg", {})}
    norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
    differ = [k for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg and norm(cfg[k]) != norm(base[k])]
    if differ:
        return (f"trained with other image preprocessing than pruner scores {arch} with "
                f"({', '.join(f'{k} {cfg[k]} vs {base[k]}' for k in differ)})")
    return None


def _other_gelu(arch: str) -> str:
    """The same architecture with the other activation (open_clip's ``-quickgelu`` variants)."""
    return arch.removesuffix("-quickgelu") if arch.endswith("-quickgelu") else f"{arch}-quickgelu"


def _quiet_console(setup_logging, *args, **kwargs) -> None:
    """open_clip_train's setup_logging, whose console handler then shows only what pruner's console shows
    (pruner.logs.PrunerProgress: train-proxy's progress lines, everyone's warnings); its log file (train/out.log)
    keeps every line, the model and argument dump included."""
    setup_logging(*args, **kwargs)
    for h in logging.root.handlers:
        if type(h) is logging.StreamHandler:
            h.addFilter(PrunerProgress())


def train_proxy(shards: Sequence[str], out_dir: str, *, arch: Optional[str] = None, config_file: Optional[str] = None,
                steps: int = 300, batch_size: int = 32, lr: float = 3e-4, warmup: Optional[int] = None,
                weight_decay: float = 0.1, optimizer: str = "adamw", momentum: float = 0.9,
                checkpoints: int = 3, random_checkpoints: int = 0, checkpoint_at: Optional[Sequence[int]] = None,
                max_shards: Optional[int] = None, pool_size: Optional[int] = None, seed: int = 0,
                pretrained: Optional[str] = None, device: str = "auto", precision: str = "auto",
                workers: Optional[int] = None, log_every: int = 10) -> Trajectory:
    """Train a proxy CLIP with open_clip_train and write ``<out_dir>/trajectory.json``; return it.
    ``arch`` / ``config_file``: :func:`proxy_arch`. ``pretrained``: start from these weights (an open_clip
    pretrained tag of ``arch`` or a local checkpoint file, checked by :func:`pretrained_source`) instead of from
    scratch. A run that fails leaves no run folder behind.

    ``steps`` optimiser updates of ``batch_size`` samples, LR warm-up over ``warmup`` steps (default steps // 10)
    then cosine decay to 0. Training data: ``max_shards`` shards drawn at random (seeded) from ``shards`` (all by
    default), streamed shuffled and repeated as needed. ``pool_size`` (N in a_t) defaults to the number of samples
    in those shards (counted by reading them). Checkpoints: see :func:`checkpoint_steps`. ``optimizer``: "adamw"
    (open_clip_train's, decoupled weight decay, none on gains/biases) or "sgd" (timm SGD with ``momentum``).
    ``device``/``precision`` "auto": CUDA with AMP when available, else CPU fp32. ``workers`` (data loader
    processes) defaults to 0 on CPU and up to 4 on CUDA; it must divide ``steps``.
    """
    arch = proxy_arch(arch, config_file)
    out = Path(out_dir).resolve()
    if (out / RUN_NAME).exists():
        raise FileExistsError(f"{out / RUN_NAME} already holds a training run (fix: choose a new --out or delete it)")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r} (fix: adamw or sgd)")
    urls = expand_shards(shards)
    if max_shards is not None and max_shards < len(urls):
        urls = sorted(random.Random(seed).sample(urls, max_shards))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "amp" if device.startswith("cuda") else "fp32"
    if workers is None:
        workers = 0 if device == "cpu" else next(w for w in (4, 3, 2, 1) if steps % w == 0 and w <= len(urls))
    if workers and (steps % workers or workers > len(urls)):
        raise ValueError(f"workers={workers} must divide steps={steps} and not exceed the {len(urls)} shards "
                         f"(fix: change --workers or --steps)")
    warmup = steps // 10 if warmup is None else warmup
    save_steps = checkpoint_steps(steps, checkpoints, random_checkpoints, seed, checkpoint_at)
    register_configs(config_file)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown arch {arch!r} (fix: pruner-tiny, pruner-micro, an open_clip name such as "
                         f"ViT-B-32, or a --config-file whose file name is <arch>.json)")
    pretrained = pretrained_source(arch, pretrained, config_file)
    if pool_size is None:
        pool_size = count_samples(urls)
        if not pool_size:  # open_clip_train would wait forever for a first batch
            raise ValueError(f"no image-caption pairs (an image and a .txt caption under one key) in {urls[:3]}"
                             f"{' ...' if len(urls) > 3 else ''} (fix: check --shards)")

    args = ["--train-data", "::".join(urls), "--dataset-type", "webdataset",
            "--train-num-samples", str(steps * batch_size), "--batch-size", str(batch_size), "--epochs", "1",
            "--model", arch, "--lr", str(lr), "--warmup", str(warmup), "--lr-scheduler", "cosine",
            "--wd", str(weight_decay), "--seed", str(seed), "--workers", str(workers), "--device", device,
            "--precision", precision, "--logs", str(out), "--name", RUN_NAME, "--log-every-n-steps", str(steps),
            "--report-to", ""]
    if optimizer == "sgd":
        args += ["--opt", "timm/momentum", "--momentum", str(momentum)]
    if pretrained:
        args += ["--pretrained", pretrained]
    log.info(f"train-proxy: {arch}{f' from {pretrained}' if pretrained else ''} on {len(urls)} shards "
             f"({pool_size} samples), {steps} steps of {batch_size}, "
             f"{optimizer} lr {lr}, device {device}, checkpoints at steps {save_steps}")
    recorder = _Recorder(save_steps, steps, log_every)
    try:
        with _open_clip_train_patched(recorder, seed) as ocm:
            if ocm.main(args) is not None or len(recorder.lrs) != steps:
                raise RuntimeError(f"open_clip_train did not complete {steps} steps "
                                   f"(see {out / RUN_NAME / 'out.log'})")
    except BaseException:  # a failed run leaves no half-written run folder, so the same command can be run again
        shutil.rmtree(out / RUN_NAME, ignore_errors=True)
        raise
    for f in (out / RUN_NAME / "checkpoints").glob("epoch_*.pt"):
        f.unlink()

    write_json_atomic(out / "trajectory.json", {
        "arch": arch, "config_file": str(Path(config_file).resolve()) if config_file else None,
        "optimizer": optimizer, "seed": seed, "total_steps": steps, "pool_size": pool_size,
        "checkpoints": [{**c, "path": str(Path(c["path"]).relative_to(out))} for c in recorder.saved],
        "lr_schedule": recorder.lrs,
        "train": {"shards": urls, "batch_size": batch_size, "lr": lr, "warmup": warmup, "lr_scheduler": "cosine",
                  "weight_decay": weight_decay, "momentum": momentum if optimizer == "sgd" else None,
                  "device": device, "precision": precision, "workers": workers, "pretrained": pretrained},
    })
    log.info(f"train-proxy wrote {out / 'trajectory.json'} ({len(recorder.saved)} checkpoints)")
    return load_trajectory(file=str(out / "trajectory.json"))
