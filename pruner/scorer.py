"""The orchestrator: one object that turns samples into score rows, knowing nothing of Ray.

``Scorer`` holds the model at every checkpoint of the trajectory it scores (one linearised open_clip model each), the
gradient computers, the per-checkpoint shared quantities and the OGA forest. The Ray layer creates one per
actor, hands it shards, and writes what it returns. Notebooks can use it directly.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from pruner.config import JobConfig
from pruner.grads.engine import PerSampleGradients
from pruner.io.shards import Sample, iter_shard, RejectLog
from pruner.model.checkpoints import Trajectory, load_scoring_model, optimizer_step_scale
from pruner.model.clip import create_clip, open_clip_name
from pruner.scores.combine import combine, split_components
from pruner.scores.methods import METHODS
from pruner.scores.components import CheckpointScorer, strict_fp32
from pruner.scores.oga import iforest_scores
from pruner.scores.propagation import propagated_directions
from pruner.scores.shared import CheckpointShared, compute_shared
from pruner.scores.step_scales import step_scale_warnings
from pruner.scores.weights import CheckpointWeights, checkpoint_weights

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SharedInputs(NamedTuple):
    """The samples behind a job's shared quantities (:func:`pick_shared_inputs`)."""
    bank: list[Sample]
    target: list[Sample]
    reference: list[list[Sample]]
    curvature: Optional[list[Sample]]  # Diff-In's propagated form only
    oga: Optional[list[Sample]]        # the OGA forest's subsample, with OGA only


def pick_pool_samples(cfg: JobConfig, pool_urls: Sequence[str],
                      picks: dict[str, tuple[int, int]]) -> dict[str, list[Sample]]:
    """For each pick ``name -> (n, head)``: the n samples with the smallest sha1(name:uid) among the first ``head``
    samples of the pool in sorted shard order (ties, i.e. a repeated uid, by position), in that hash order. So the
    choice is the same for every worker and run, and shards appended later, sorting after the head, do not change it.

    One pass over the longest head reads every pick; each pick keeps a bounded heap of its n best, so memory holds
    at most the picked samples (plus the one being read), not the head."""
    heaps: dict[str, list] = {name: [] for name in picks}
    horizon = max((head for _, head in picks.values()), default=0)
    for pos, sample in enumerate(itertools.islice(iter_pool(pool_urls, cfg.data.allow_pipe), horizon)):
        for name, (n, head) in picks.items():
            if pos >= head or n <= 0:
                continue
            key = (-int(hashlib.sha1(f"{name}:{sample.uid}".encode()).hexdigest(), 16), -pos)  # max-heap of (hash, pos)
            heap = heaps[name]
            if len(heap) < n:
                heapq.heappush(heap, (key, sample))
            elif key > heap[0][0]:
                heapq.heapreplace(heap, (key, sample))
    return {name: [smp for _, smp in sorted(heap, key=lambda e: e[0], reverse=True)] for name, heap in heaps.items()}


def iter_pool(urls: Sequence[str], allow_pipe: bool = False) -> Iterable[Sample]:
    rejects = RejectLog()
    for url in sorted(urls):
        yield from iter_shard(url, rejects, allow_pipe=allow_pipe)


def pick_shared_inputs(cfg: JobConfig, pool_urls: Sequence[str], target_urls: Sequence[str], bank: bool = True,
                       curvature: bool = False, oga: bool = False) -> SharedInputs:
    """The samples of a job's shared quantities, from one pass over the pool's head (:func:`pick_pool_samples`):
    the bank and the reference batches, hash-selected among the first 4 x max(bank, reference) samples; with
    ``curvature``, Diff-In's propagated-form curvature subsample among the first 4 x ``curvature_samples``; with
    ``oga``, the OGA forest's subsample, the first ``scores.oga.iforest_sample``. The target is the first
    ``target.max_samples`` samples of the sorted target shards."""
    d = cfg.scores.diffin
    n_bank, n_ref = (cfg.features.bank_size if bank else 0), d.reference_batches * d.reference_batch_size
    head = 4 * max(n_bank, n_ref)
    picks = {"bank": (n_bank, head), "reference": (n_ref, head)}
    if curvature:
        picks["curvature"] = (d.curvature_samples, 4 * d.curvature_samples)
    if oga:
        picks["oga"] = (cfg.scores.oga.iforest_sample, cfg.scores.oga.iforest_sample)
    got = pick_pool_samples(cfg, pool_urls, picks)
    reference = [got["reference"][i::d.reference_batches] for i in range(d.reference_batches)]
    target = list(itertools.islice(iter_pool(target_urls, cfg.data.allow_pipe), cfg.target.max_samples))
    return SharedInputs(got["bank"], target, reference, got.get("curvature"), got.get("oga"))


def pick_curvature_samples(cfg: JobConfig, pool_urls: Sequence[str]) -> list[Sample]:
    """The samples Diff-In's propagated form estimates each checkpoint's sketched curvature on (hash-selected among
    the first 4 x ``scores.diffin.curvature_samples`` samples of the pool, like the bank)."""
    n = cfg.scores.diffin.curvature_samples
    return pick_pool_samples(cfg, pool_urls, {"curvature": (n, 4 * n)})["curvature"]


def uses_propagation(cfg: JobConfig) -> bool:
    """Whether a job forms Diff-In's propagated terms (pruner.scores.propagation)."""
    d = cfg.scores.diffin
    return "diffin" in cfg.scores.methods and d.form == "propagated" and bool(d.targets)


def input_digests(inputs: SharedInputs) -> dict[str, str]:
    """sha256 of the uids of the samples behind a job's shared quantities, in the order they are used: ``bank``,
    ``reference`` (the reference batches), ``target`` and, with OGA, ``oga`` (the Isolation Forest's subsample), with
    Diff-In's propagated form ``curvature``; what ``shared/inputs.json`` records
    (pruner.jobs.resume.check_shared_inputs)."""
    picked = {"bank": inputs.bank, "reference": [s for batch in inputs.reference for s in batch],
              "target": inputs.target}
    if inputs.oga is not None:
        picked["oga"] = inputs.oga
    if inputs.curvature is not None:
        picked["curvature"] = inputs.curvature
    return {k: hashlib.sha256(json.dumps([s.uid for s in v]).encode()).hexdigest() for k, v in picked.items()}


def combine_columns(cfg: JobConfig, weights: Sequence[CheckpointWeights], forest,
                    comps: list[dict[str, np.ndarray]], features_last: np.ndarray,
                    uids: Sequence[str]) -> dict[str, np.ndarray]:
    """Method score columns from per-checkpoint components, with the weights of each checkpoint (b_t only in
    Diff-In's exact_increment form) and the OGA forest (or None) applied to the last checkpoint's features (see
    pruner.scores.combine)."""
    exact = cfg.scores.diffin.form == "exact_increment"  # the propagated form's terms are weighted already
    cols = combine(comps, [w.eta for w in weights], [w.a_t for w in weights], list(uids), seed=cfg.seed,
                   b_ts=[w.b_t for w in weights] if exact else None, methods=cfg.scores.methods)
    if forest is not None:
        cols["oga_iforest"] = iforest_scores(forest, features_last)
    return cols


def computed_quantities(cfg: JobConfig) -> tuple[bool, bool]:
    """(features, norms): whether a job's passes form projected features P g_z (OGA's L1 and Isolation Forest,
    stored features for rescore / explain / policies) and exact gradient norms (TracIn self-influence, OGA L2; the
    Diff-In self target needs them too, and :class:`CheckpointScorer` turns them on for it). Neither is free
    (projections; per-sample norms), so a job that reads neither, such as ``scores.methods: [diffin]`` with
    ``features.save: false``, skips both (benchmarks/bench_diffin_cost.py)."""
    methods, f = [METHODS[m] for m in cfg.scores.methods], cfg.features
    return (any(m.needs_features for m in methods) or f.save or f.save_hzg or uses_propagation(cfg),
            any(m.needs_norms for m in methods))


def propagation_terms(shared: Sequence[CheckpointShared], weights: Sequence[CheckpointWeights],
                      targets: Sequence[str]) -> list[dict]:
    """Per checkpoint, what its scorer needs of Diff-In's propagated form (pruner.scores.propagation): the k-vectors
    w_t ("target", "train" among ``targets``; the adjoint from the last checkpoint's projected gradient, which
    depends on every checkpoint), the summed step size h_t = LR x updates x the optimiser's step scale, and
    b_t = h_t / N. ``shared`` must hold every checkpoint of the trajectory."""
    if len(shared) != len(weights):
        raise ValueError(f"the propagated form needs the shared quantities of all {len(weights)} checkpoints, got "
                         f"{len(shared)}")
    h = [w.eta * s.step_scale for w, s in zip(weights, shared)]
    b = [w.b_t * s.step_scale for w, s in zip(weights, shared)]
    curv = [s.curvature for s in shared]
    dirs: list[dict[str, torch.Tensor]] = [{} for _ in shared]
    for name in ("target", "train"):
        if name in targets and name in shared[-1].projected:
            for c, w in enumerate(propagated_directions(shared[-1].projected[name].double(), curv, h, b)):
                dirs[c][name] = w
    return [{"prop_directions": d, "prop_step": hc, "prop_weight": bc} for d, hc, bc in zip(dirs, h, b)]


def source_url(meta: dict) -> str | None:
    """Where a sample came from, when its json says so: the ``url`` field img2dataset writes (DataComp's shards carry
    it too); None otherwise."""
    url = meta.get("url")
    return url if isinstance(url, str) and url else None


class ShardChangedError(ValueError):
    """A shard no longer reads as the samples a job being extended scored from it."""


class Scorer:
    """Scores samples at the checkpoints ``first``.. of a trajectory. Shapes: images [B,3,H,W], tokens [B,ctx].

    ``first`` > 0 extends a finished job whose trajectory was the first ``first`` checkpoints (``pruner rescore
    --add-checkpoint``): the earlier checkpoints are not loaded, their components come from the job's score
    table (:meth:`score_table`'s ``prior``), and every checkpoint index below (``compute_shared``'s ``i``) is an
    index into the whole trajectory, whose weights the scores are combined with."""

    def __init__(self, cfg: JobConfig, traj: Trajectory, device: str | torch.device = "auto", first: int = 0):
        if not 0 <= first < len(traj.checkpoints):
            raise ValueError(f"first={first}: a trajectory of {len(traj.checkpoints)} checkpoints")
        strict_fp32()
        torch.manual_seed(cfg.seed)
        self.cfg, self.traj, self.first = cfg, traj, first
        self.device = resolve_device(device) if isinstance(device, str) else device
        arch = traj.arch or cfg.model.arch
        config_file = cfg.model.config_file or traj.config_file
        model, self.preprocess, self.tokenizer = create_clip(arch, config_file)
        # the trainable parameters in open_clip's names and registration order: what names an optimiser state's
        # positions (pruner.model.checkpoints.optimizer_step_scale)
        self.open_clip_params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        del model
        f = cfg.features
        self.engines = []
        for ck in traj.checkpoints[first:]:
            model = load_scoring_model(ck, arch, config_file, device=self.device)
            self.engines.append(PerSampleGradients(model, k=f.k, layer_k=f.layer_k, seed=f.seed, kind=f.projection,
                                                   include=f.include, exclude=f.exclude,
                                                   precision=cfg.model.precision, single_token_k=f.single_token_k,
                                                   single_token_layers=f.single_token_layers,
                                                   single_token_direct=f.single_token_direct))
        self.weights = checkpoint_weights(cfg, traj)
        self.shared: list[CheckpointShared] = []
        self.scorers: list[CheckpointScorer] = []
        self.forest = None

    # -- inputs -------------------------------------------------------------------------------------------
    def tensors(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.preprocess(s.image) for s in samples])
        return images, self.tokenizer([s.caption for s in samples])

    def batches(self, samples: Sequence[Sample], batch_size: Optional[int] = None):
        """[(images, tokens)] per batch of ``features.batch_size`` samples."""
        return [(i, t) for i, t, _ in self.uid_batches(samples, batch_size)]

    def uid_batches(self, samples: Sequence[Sample], batch_size: Optional[int] = None):
        """Lazily, (images, tokens, uids [B]) per batch of ``features.batch_size`` samples."""
        bs = batch_size or self.cfg.features.batch_size
        for i in range(0, len(samples), bs):
            part = samples[i:i + bs]
            yield *self.tensors(part), [s.uid for s in part]

    # -- shared quantities (one worker per checkpoint) ------------------------------------------------------
    def compute_shared(self, i: int, bank: Sequence[Sample], target: Sequence[Sample],
                       reference: Sequence[Sequence[Sample]],
                       curvature: Sequence[Sample] = ()) -> CheckpointShared:
        """Checkpoint i's shared quantities; ``curvature``: the samples of Diff-In's propagated form's sketched
        curvature (:func:`pick_curvature_samples`; ignored by the other forms)."""
        d = self.cfg.scores.diffin
        targets = d.targets if "diffin" in self.cfg.scores.methods else []
        if not self.first <= i < len(self.weights):
            raise IndexError(f"checkpoint {i}: this scorer loads checkpoints {self.first}..{len(self.weights) - 1}")
        w = self.weights[i]
        prop = uses_propagation(self.cfg)
        batches = list(self.uid_batches(curvature)) if prop else []
        path, engine = self.traj.checkpoints[i].path, self.engines[i - self.first]
        scale, basis = optimizer_step_scale(path, self.open_clip_params, {open_clip_name(n) for n in engine.params()}) \
            if prop else (1.0, "sgd")
        shared = compute_shared(engine, index=i, step=w.step, eta=w.eta, a_t=w.a_t,
                                bank_batches=self.batches(bank), bank_uids=[s.uid for s in bank],
                                target_batches=self.batches(target), target_uids=[s.uid for s in target],
                                reference_batches=[self.tensors(r) for r in reference], targets=targets,
                                hvp_eps=d.hvp_eps, self_rank=d.self_rank, seed=self.cfg.seed, form=d.form,
                                curvature_batches=[(x, t) for x, t, _ in batches],
                                curvature_uids=[u for _, _, u in batches],
                                curvature_rank=d.curvature_rank, step_scale=scale,
                                train_batch_size=d.train_batch_size,
                                step_scale_source="optimizer_all_parameters" if basis == "all" else "optimizer")
        for warning in step_scale_warnings([{"checkpoint": i, "step_scale": shared.step_scale,
                                             "source": shared.step_scale_source}], d.train_batch_size):
            log.warning(warning)
        return shared

    def set_shared(self, shared: Sequence[CheckpointShared]) -> None:
        """The shared quantities of checkpoints ``first``.. (one per loaded model)."""
        d = self.cfg.scores.diffin
        targets = d.targets if "diffin" in self.cfg.scores.methods else []
        self.shared = [s if s.bank_img.device == self.device else CheckpointShared.from_state(s.to_state(), self.device)
                       for s in shared]
        features, norms = computed_quantities(self.cfg)
        prop = propagation_terms(self.shared, self.weights, targets) if uses_propagation(self.cfg) else \
            [{}] * len(self.shared)
        self.scorers = [CheckpointScorer(e, s, targets=targets, fd_eps=d.fd_eps, fd_scheme=d.fd_scheme,
                                         loss=self.cfg.features.loss, base_pass=d.base_pass, features=features,
                                         norms=norms, form=d.form, **p)
                        for e, s, p in zip(self.engines, self.shared, prop)]

    def last_checkpoint_features(self, samples: Sequence[Sample]) -> np.ndarray:
        """Projected gradients [n, k] at the last checkpoint (the OGA forest's training rows)."""
        return np.concatenate([self.scorers[-1](i, t, uids)[1] for i, t, uids in self.uid_batches(samples)])

    # -- scoring --------------------------------------------------------------------------------------------
    def score_components(self, samples: Sequence[Sample], project_hzg: bool = False):
        """Per-checkpoint components and projected vectors for a list of samples.

        Returns (components: list over the loaded checkpoints (``first``..) of {name: float64 [n]}, features: list of
        P g_z [n, k] float32 (None per checkpoint when the job forms no features, :func:`computed_quantities`), hzg:
        list of P H_z G_B [n, k] float32, or [] unless ``project_hzg``). Components depend only on the
        checkpoint, its shared quantities and the sample, never on the other checkpoints (a_t and eta are
        applied in :meth:`combine_scores`), so they can be cached and recombined."""
        if not self.scorers:
            raise RuntimeError("set_shared() must be called before scoring")
        m = len(self.scorers)
        comps: list[dict[str, list]] = [{} for _ in range(m)]
        feats: list[list[np.ndarray]] = [[] for _ in range(m)]
        hzgs: list[list[np.ndarray]] = [[] for _ in range(m)]
        for images, tokens, uids in self.uid_batches(samples):
            for i, sc in enumerate(self.scorers):
                comp, f, h = sc.compute(images, tokens, uids, project_hzg=project_hzg)
                for k, v in comp.items():
                    comps[i].setdefault(k, []).append(v)
                if f is not None:
                    feats[i].append(f)
                if h is not None:
                    hzgs[i].append(h)
        empty = np.zeros((0, self.cfg.features.k), np.float32) if self.scorers[-1].features else None
        return ([{k: np.concatenate(v) for k, v in c.items()} for c in comps],
                [np.concatenate(f) if f else empty for f in feats],
                [np.concatenate(h) for h in hzgs] if project_hzg else [])

    def combine_scores(self, comps: list[dict[str, np.ndarray]], features_last: np.ndarray,
                       uids: Sequence[str]) -> dict[str, np.ndarray]:
        """Score columns from the components of every checkpoint of the trajectory (loaded or not)."""
        if len(comps) != len(self.weights):
            raise ValueError(f"components of {len(comps)} checkpoints for a trajectory of {len(self.weights)}")
        return combine_columns(self.cfg, self.weights, self.forest, comps, features_last, uids)

    def score(self, samples: Sequence[Sample]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Score columns [n] and projected features per checkpoint [n, k] for a list of samples."""
        comps, features, _ = self.score_components(samples)
        return self.combine_scores(comps, features[-1], [s.uid for s in samples]), features

    def score_table(self, samples: Sequence[Sample], url: str, prior: pa.Table | None = None):
        """A per-shard result: (table: uid, key, shard_url, row, caption, url (the json ``url`` of img2dataset-made
        shards, or null), then every score column (float64),
        [P g_z [n, k] per loaded checkpoint], [P H_z G_B [n, k] per loaded checkpoint] when features.save_hzg else
        []). ``prior``: the shard's score table from the job this one extends (needed iff ``first`` > 0); its
        ``c<i>_*`` columns supply the components of checkpoints 0..first-1, and its uids must be ``samples``'."""
        if (prior is None) != (self.first == 0):
            raise ValueError(f"{url}: a prior score table is needed exactly when extending a job (first={self.first})")
        uids = [s.uid for s in samples]
        if prior is not None and prior["uid"].to_pylist() != uids:
            raise ShardChangedError(f"shard {url} changed since the job being extended scored it: it now reads as "
                                    f"{len(uids)} samples, that job scored {prior.num_rows}, and their uids or order "
                                    f"differ (fix: run a full job with the longer trajectory)")
        cols, features, hzg = {}, [], []
        if samples:
            comps, features, hzg = self.score_components(samples, project_hzg=self.cfg.features.save_hzg)
            if prior is not None:
                comps = split_components({c: prior[c].to_numpy() for c in prior.column_names}, self.first) + comps
            cols = self.combine_scores(comps, features[-1], uids)
        table = {"uid": pa.array(uids, pa.string()),
                 "key": pa.array([s.key for s in samples], pa.string()),
                 "shard_url": pa.array([url] * len(samples), pa.string()),
                 "row": pa.array(np.arange(len(samples), dtype=np.int32)),
                 "caption": pa.array([s.caption for s in samples], pa.string()),
                 "url": pa.array([source_url(s.meta) for s in samples], pa.string())}
        for k in sorted(cols):
            table[k] = pa.array(cols[k], pa.float64())
        return pa.table(table), features, hzg
