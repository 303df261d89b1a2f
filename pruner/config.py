"""Job configuration: one YAML file plus ``key.path=value`` overrides, validated before any Ray or model work.

Every section forbids unknown keys, so a typo fails with the key path instead of being silently ignored.
``load_config`` is the only entry point; it raises :class:`ConfigError` whose message lists every problem as
``<key.path>: <what is wrong> (fix: ...)``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruner.scores.combine import method_of, score_columns, target_set_columns
from pruner.scores.methods import METHODS, register


class ConfigError(ValueError):
    """The job config is invalid; the message names each offending key path and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """The pool to prune: WebDataset shards given as directories, globs, brace patterns or fsspec URLs."""

    shards: list[str] = Field(min_length=1)
    allow_pipe: bool = False  # webdataset `pipe:` URLs run shell commands; refused unless set
    max_samples_per_shard: Optional[int] = Field(default=None, gt=0)


class TargetConfig(_Section):
    """The target set V whose loss the influence scores refer to (a held-out WebDataset)."""

    shards: list[str] = Field(default_factory=list)
    max_samples: int = Field(default=512, gt=0)


class ModelConfig(_Section):
    """The open_clip architecture. ``arch`` is an open_clip model name or a bundled pruner config
    (``pruner-tiny``, ``pruner-micro``); ``config_file`` registers a custom open_clip JSON config first."""

    arch: str = "pruner-tiny"
    config_file: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _arch_of_config_file(self):
        """open_clip names a custom config by its file name: with ``config_file`` and no ``arch``, that name is the
        arch; a different ``arch`` would silently build another model."""
        if self.config_file is not None:
            stem = Path(self.config_file).stem
            if "arch" not in self.model_fields_set:
                self.arch = stem
            elif self.arch != stem:
                raise ValueError(f"arch {self.arch!r} does not match config_file {self.config_file}, which defines "
                                 f"{stem!r} (open_clip names a config by its file name) (fix: drop arch, or name the "
                                 f"file {self.arch}.json)")
        return self


class TrajectoryConfig(_Section):
    """Checkpoints to score at: a trajectory file (JSON list of {path, step, lr}) or OpenCLIP checkpoints."""

    file: Optional[str] = None
    checkpoints: list[str] = Field(default_factory=list)
    pool_size: Optional[int] = Field(default=None, gt=0)  # N in a_t; default: samples read in the pool

    @model_validator(mode="after")
    def _one_source(self):
        if not self.file and not self.checkpoints:
            raise ValueError("give either trajectory.file or trajectory.checkpoints (fix: point to the "
                             "trajectory.json written by `pruner train-proxy`)")
        if self.file and self.checkpoints:
            raise ValueError("give trajectory.file or trajectory.checkpoints, not both")
        return self


class FeaturesConfig(_Section):
    """Per-sample projected gradients (see pruner.grads)."""

    k: int = Field(default=1024, gt=0)
    layer_k: int = Field(default=16, gt=0)  # per-layer factor dimension (k_out = k_in = layer_k)
    # Khatri-Rao sketch rows for the layers whose per-sample gradient has a single token (rank 1: the output
    # projections, each tower's last block out_proj / MLP); None: min(k, 1024); 0: the Kronecker sketch there too
    # (see pruner.grads.project)
    single_token_k: Optional[int] = Field(default=None, ge=0)
    # fnmatch patterns naming those layers; None: picked from the layer names of the linearised open_clip model
    single_token_layers: Optional[list[str]] = None
    # add the Khatri-Rao blocks straight into the k-dim output (when single_token_k <= k) instead of through the
    # dense reduction R: no second sketch on them (more accurate) and a smaller R (faster)
    single_token_direct: bool = True
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = 0
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    loss: Literal["bank", "in_batch"] = "bank"
    bank_size: int = Field(default=4096, gt=0)
    batch_size: int = Field(default=64, gt=0)
    save: bool = True  # store P g_z per checkpoint (needed by explain, clustering and rescore)
    save_hzg: bool = False  # also store P H_z G_B (2 x the storage; lets rescore re-target the taylor form)

    @field_validator("single_token_layers")
    @classmethod
    def _patterns(cls, v):
        if v is not None and any(not p.strip() for p in v):
            raise ValueError("empty layer pattern (fix: fnmatch patterns such as 'visual.proj', or leave "
                             "single_token_layers unset for the automatic choice)")
        return v


class DiffInConfig(_Section):
    targets: list[Literal["target", "self", "train"]] = Field(default_factory=lambda: ["target", "train"])
    # exact_increment: sum_t b_t <v_t, g_z(theta_t)> + a_t <v_t, H_B g_z>, the first-order increment evaluated at
    # each checkpoint (one pass per sample); taylor: sum_t a_t <v_t, H_B g_z + H_z G_B>, the paper's and official
    # code's estimator, which Taylor-expands that increment around theta_0 and drops its offset (two finite-
    # difference passes). propagated (the default): the recursion delta_{t+1} = (I - eta H) delta_t + (eta / N) g_z
    # solved in closed form in the k-dim sketch (pruner.scores.propagation), with H the sketched Gauss-Newton matrix
    # of curvature_samples pool samples. Why: README, Decisions; benchmarks/RESULTS.md, "Target-aware coresets".
    form: Literal["exact_increment", "taylor", "propagated"] = "propagated"
    curvature_samples: int = Field(default=2048, gt=1)  # propagated: the subsample K_t is estimated on
    curvature_rank: int = Field(default=512, gt=0)  # propagated: eigenpairs of K_t kept
    # propagated, for checkpoints without optimiser state only: the global batch size they were trained with (every
    # device, times gradient accumulation: what Adam's second moments saw). Their step scale (Adam's 1/(sqrt(v) +
    # eps), which the optimiser state holds) is then estimated from minibatch gradients at this batch size, assuming
    # Adam(W) with eps 1e-8 (pruner.scores.shared.estimated_step_scale). 256: a small training run's batch; the
    # estimate grows with up to the square root of the batch size, and the selections move little
    # within a few times the true scale (benchmarks/RESULTS.md, "Checkpoints without optimiser state"), so a guess
    # within ~10x of the true batch size serves.
    train_batch_size: int = Field(default=256, gt=0)
    # fd_eps, fd_scheme, base_pass: the taylor form's finite-difference passes (unused by exact_increment)
    fd_eps: float = Field(default=1e-2, gt=0)  # L2 norm of the parameter perturbation for T2
    fd_scheme: Literal["central", "forward"] = "central"
    # central only: base quantities (loss, TracIn dots, features, norms) from the mean of the two FD passes, exact
    # to O(fd_eps^2) like T2 (2 passes per sample), or from an extra pass at theta_t ("exact", 3 passes)
    base_pass: Literal["midpoint", "exact"] = "midpoint"
    hvp_eps: float = Field(default=1e-2, gt=0)  # L2 norm of the perturbation for u = H_B v (shared)
    reference_batches: int = Field(default=1, gt=0)
    reference_batch_size: int = Field(default=128, gt=1)
    self_rank: int = Field(default=4, ge=1)  # eigenpairs of H_B for the g^T H_B g self-influence term
    lr_weighting: Literal["interval_mean", "at_checkpoint"] = "interval_mean"


class OGAConfig(_Section):
    trim_fraction: float = Field(default=0.05, gt=0, lt=1)
    iforest_sample: int = Field(default=10000, gt=1)
    iforest_trees: int = Field(default=100, gt=0)


class ScoresConfig(_Section):
    # plug-in score methods: modules defining METHOD, a pruner.scores.methods.ScoreMethod subclass' instance with its
    # combine, imported (and their
    # method registered) when the config is validated, on the driver and on every actor, so each must be importable
    # there (installed, or shipped with `ray job submit --working-dir`). Listed before ``methods``, which they extend.
    plugins: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=lambda: ["diffin", "tracin", "oga", "baselines"])
    diffin: DiffInConfig = Field(default_factory=DiffInConfig)
    oga: OGAConfig = Field(default_factory=OGAConfig)

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, plugins: list[str]) -> list[str]:
        for name in plugins:
            try:
                method = getattr(importlib.import_module(name), "METHOD")
            except (ImportError, AttributeError) as e:
                raise ValueError(f"plug-in {name!r}: {e} (fix: a module importable here and on the Ray actors that "
                                 f"defines METHOD, an instance of a pruner.scores.methods.ScoreMethod subclass with its combine)") from None
            if METHODS.get(method.name) is not method:
                register(method)
        return plugins

    @field_validator("methods")
    @classmethod
    def _registered(cls, methods: list[str]) -> list[str]:
        """Names of registered score methods (pruner.scores.methods: the built-ins and any plug-in)."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown score method(s) {unknown} (fix: use the registered ones, {list(METHODS)})")
        return methods


class SelectConfig(_Section):
    """How the scores turn into a keep set (pruner.select). Exactly one of keep_fraction, keep_count, threshold.

    The default pipeline (``score`` and ``filter_score`` ``auto``, resolved when the config is loaded): with a
    target set, a filter stage drops the ``filter_fraction`` of the pool with the highest proxy loss
    (:data:`TARGET_FREE_SCORE`, the proxy's own statistic for mismatched pairs, which no gradient score beats), then
    the rest is ranked by ``diffin_target`` (help to the target); without one, the pool is ranked by
    :data:`TARGET_FREE_SCORE`. ``filter_score: null`` turns the filter stage off.

    The niche test (``niche_alpha``, pruner.select.niche and .stages): behind the filter stage, in front of the
    top-k of ``diffin_target`` (the propagated form), the reduce step tests at level ``niche_alpha`` whether the
    target score singles out samples that help the target more than the bulk of the pool does (a niche of the pool,
    where help to the target beats a quality filter). A niche: the passing samples are ranked by the target
    score. A target drawn like the pool itself shows no niche, and the pool is ranked by ``filter_score`` alone.
    summary.json records the test. ``niche_alpha: null`` turns it off
    (the filter stage, then the target score ranks the rest).

    ``policy`` ``top_k`` keeps the global best (pruner.select.rank); ``cluster_balanced`` / ``class_balanced``
    keep the same share of every gradient cluster (``n_clusters``, spherical k-means on the stored features) or
    of every class (the json field ``label_key``), best first within each (pruner.select.policies).
    ``dedup_threshold`` (a cosine in (0, 1]) first drops near-duplicates of better-ranked samples in
    ``dedup_space`` (stored gradient features, or CLIP embeddings at the last checkpoint). Policies and dedup keep
    a budget, so they take keep_fraction or keep_count, not threshold; the gradient-space ones need
    ``features.save``."""

    score: str = "auto"
    # the filter stage: samples whose filter_score is among the lowest filter_fraction of the pool are never kept
    filter_score: Optional[str] = "auto"
    filter_fraction: float = Field(default=0.2, ge=0, lt=1)
    # the niche test's level (pruner.select.niche); applies to diffin_target (propagated form) behind a filter stage
    niche_alpha: Optional[float] = Field(default=1e-3, gt=0, lt=1)
    keep_fraction: Optional[float] = Field(default=None, gt=0, le=1)
    keep_count: Optional[int] = Field(default=None, gt=0)
    threshold: Optional[float] = None
    policy: Literal["top_k", "cluster_balanced", "class_balanced"] = "top_k"
    dedup_threshold: Optional[float] = Field(default=None, gt=0, le=1)
    dedup_space: Literal["gradient", "embedding"] = "gradient"
    n_clusters: int = Field(default=100, gt=0)  # cluster_balanced only
    label_key: str = "classname"  # class_balanced only: the json field holding the class

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [n for n in ("keep_fraction", "keep_count", "threshold") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep_fraction, keep_count, threshold (got {', '.join(given)})")
        if self.threshold is not None and self.uses_policy:
            raise ValueError(f"threshold cannot be combined with policy {self.policy!r} or dedup_threshold: "
                             f"policies keep a budget (fix: give keep_fraction or keep_count instead)")
        if not given:
            self.keep_fraction = 0.5
        return self

    @property
    def uses_policy(self) -> bool:
        """True when the keep set comes from pruner.select.policies rather than the plain global top-k."""
        return self.policy != "top_k" or self.dedup_threshold is not None

    @property
    def needs_features(self) -> bool:
        """True when the policy reads the stored gradient features (clustering or gradient-space dedup)."""
        return self.policy == "cluster_balanced" or (self.dedup_threshold is not None
                                                      and self.dedup_space == "gradient")


#: The target-free score of the default pipeline: its filter stage's statistic and the ranking without a target set
#: (or without a niche). The proxy's own loss against the bank, not the CLIP score: the two are the best target-free
#: detectors of mismatched pairs and tie on retrained coresets, and the loss leads in detection AUROC on average in
#: every measurement (on 8 of 10 seeds in the latest). It discounts images and captions that match everything, which
#: the CLIP score counts as agreement. benchmarks/RESULTS.md, "Loss or CLIP score".
TARGET_FREE_SCORE = "baseline_loss"


def default_score(columns: list[str]) -> str:
    """``select.score: auto``: help to the target set (Diff-In's, else TracIn's) when there is one, else
    :data:`TARGET_FREE_SCORE`, else the first column the job produces."""
    return next((c for c in ("diffin_target", "tracin_target", TARGET_FREE_SCORE) if c in columns), columns[0])


def default_filter(score: str, columns: list[str]) -> Optional[str]:
    """``select.filter_score: auto``: :data:`TARGET_FREE_SCORE` in front of a target-set score (it finds the
    mismatched pairs a target score keeps), none in front of a target-free one."""
    return TARGET_FREE_SCORE if score in target_set_columns() and TARGET_FREE_SCORE in columns else None


class RayConfig(_Section):
    address: Optional[str] = None  # None: a private local Ray instance
    # auto: one scoring actor per GPU in the cluster when the job starts, else num_actors CPU actors.
    # gpu: num_actors actors with one GPU each, requested even if no GPU node is up yet (an autoscaling cluster
    # adds GPU workers for them; see deploy/raycluster.yaml). cpu: num_actors CPU actors.
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    num_actors: int = Field(default=2, gt=0)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    # how long to wait for the first actor to be placed (e.g. while the autoscaler starts a GPU node) before the
    # job fails with an error naming the missing resources
    placement_timeout_s: float = Field(default=1800.0, gt=0)


class JobConfig(_Section):
    name: str = "pruner-job"
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig
    target: TargetConfig = Field(default_factory=TargetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    trajectory: TrajectoryConfig
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ \t\n"):
            raise ValueError("must be non-empty without slashes or spaces (fix: e.g. name: cc3m-prune)")
        return v

    @model_validator(mode="after")
    def _cross_checks(self):
        d = self.scores.diffin
        if "target" in d.targets and not self.target.shards:
            if "targets" not in d.model_fields_set:  # the default targets: without a target set, the others
                d.targets = [t for t in d.targets if t != "target"]
            elif "diffin" in self.scores.methods:
                raise ValueError("scores.diffin.targets contains 'target' but target.shards is empty "
                                 "(fix: set target.shards to a held-out WebDataset, or drop 'target')")
        methods, targets = self.scores.methods, self.scores.diffin.targets
        columns = score_columns(methods, targets, bool(self.target.shards))
        if self.select.score == "auto":
            self.select.score = default_score(columns)
        if self.select.filter_score == "auto":
            self.select.filter_score = default_filter(self.select.score, columns)
        score = self.select.score
        if self.select.filter_score is not None and self.select.filter_score not in columns:
            raise ValueError(f"select.filter_score {self.select.filter_score!r} is not a column the configured methods "
                             f"produce (fix: one of {columns}, or null for no filter stage)")
        if score not in columns:
            method = method_of(score)
            if method is None:
                why, fix = "is not a score column", ""
            elif method not in methods:
                why, fix = f"is a {method} score but scores.methods is {methods}", f"add {method} to scores.methods"
            elif method == "diffin" and score.removeprefix("diffin_") not in targets:
                why, fix = f"needs the target {score.removeprefix('diffin_')!r} in scores.diffin.targets {targets}", \
                    "add it"
            else:
                why, fix = "is formed from the target set but target.shards is empty", "set target.shards"
            raise ValueError(f"select.score {score!r} {why} (fix: {fix + ', or ' if fix else ''}set select.score to "
                             f"one of the columns the configured methods produce: {columns})")
        if self.features.save_hzg and self.scores.diffin.form != "taylor":
            raise ValueError("features.save_hzg stores P H_z G_B, a term of scores.diffin.form 'taylor' only "
                             "(fix: drop save_hzg: the exact_increment form re-targets from the stored features "
                             "alone, or set scores.diffin.form: taylor)")
        if self.select.niche_alpha is not None and not self.niche_test_applies:
            default = SelectConfig.model_fields["niche_alpha"].default
            if "niche_alpha" in self.select.model_fields_set and self.select.niche_alpha != default:
                raise ValueError(f"select.niche_alpha tests diffin_target of scores.diffin.form 'propagated' behind a "
                                 f"filter stage, kept by top-k to a budget, but select.score is {score!r}, the form "
                                 f"{self.scores.diffin.form!r}, select.filter_score {self.select.filter_score!r}, "
                                 f"select.policy {self.select.policy!r}, dedup_threshold "
                                 f"{self.select.dedup_threshold} and threshold {self.select.threshold} (fix: set "
                                 f"select.niche_alpha: null; the first-order scores show no niche: "
                                 f"pruner.select.niche)")
            self.select.niche_alpha = None  # the default (a job's config.yaml holds it too) where it cannot run
        if self.select.needs_features and not self.features.save:
            raise ValueError("select.policy cluster_balanced and gradient-space dedup read the stored gradient "
                             "features, but features.save is false (fix: set features.save: true, or use "
                             "select.dedup_space: embedding / policy class_balanced)")
        return self

    @property
    def niche_test_applies(self) -> bool:
        """True when the niche test can run: the top-k of diffin_target of the propagated form to a budget behind a
        filter stage (policies and dedup keep their own order within groups; a threshold is on the score's own
        scale, which the pipeline's order does not keep)."""
        return (self.select.score == "diffin_target" and self.scores.diffin.form == "propagated"
                and self.select.filter_score is not None and not self.select.uses_policy
                and self.select.threshold is None)

    def to_yaml(self) -> bytes:
        """The resolved config as a job directory's ``config.yaml`` holds it (read back by :func:`load_job_config`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False).encode()

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the scores: not output_dir, ray settings, the job name, or
        ``select`` (the selection is re-derived from the stored score tables, so a job re-run with other select
        settings reuses its job directory and only re-selects)."""
        d = self.model_dump(mode="json")
        for k in ("output_dir", "ray", "name", "select"):
            d.pop(k, None)
        if self.scores.diffin.form != "propagated":  # keys no other form reads: job ids of those forms stay as they were
            for k in ("curvature_samples", "curvature_rank", "train_batch_size"):
                d["scores"]["diffin"].pop(k, None)
        if self.scores.diffin.train_batch_size == 256:  # added later: job ids at the default stay as they were
            d["scores"]["diffin"].pop("train_batch_size", None)
        if not self.scores.plugins:  # added with plug-in methods: job ids of jobs without any stay as they were
            d["scores"].pop("plugins")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (fix: remove it or check the spelling against README 'Job config')"
        elif e["type"] == "missing":
            msg = "required key is missing (fix: add it)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def apply_override(d: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key.path=value")
    key, raw = override.split("=", 1)
    *sections, leaf = key.strip().split(".")
    cur, bad = _section(d, sections)
    if bad is not None:
        raise ConfigError(f"override {override!r}: {bad} is not a section")
    cur[leaf] = yaml.safe_load(raw)


def _section(d: dict, names: list[str]) -> tuple[dict | None, str | None]:
    """(the nested section ``d[names[0]][names[1]]...``, created where missing, None) or (None, the first name
    whose value is not a mapping)."""
    cur = d
    for name in names:
        cur = cur.setdefault(name, {})
        if not isinstance(cur, dict):
            return None, name
    return cur, None


def absolute_spec(p: str, base: Path) -> str:
    """A shard spec or file path as an absolute local path, relative ones taken from ``base``; URLs and ``pipe:``
    commands unchanged."""
    if "://" in p or p.startswith("pipe:") or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def _resolve_paths(d: dict, base: Path) -> None:
    """Make relative local paths in the config relative to the config file's folder."""
    for section, key in (("data", "shards"), ("target", "shards"), ("trajectory", "checkpoints")):
        sec = d.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), list):
            sec[key] = [absolute_spec(p, base) if isinstance(p, str) else p for p in sec[key]]
    traj = d.get("trajectory")
    if isinstance(traj, dict) and isinstance(traj.get("file"), str):
        traj["file"] = absolute_spec(traj["file"], base)
    model = d.get("model")
    if isinstance(model, dict) and isinstance(model.get("config_file"), str):
        model["config_file"] = absolute_spec(model["config_file"], base)
    if isinstance(d.get("output_dir"), str):
        d["output_dir"] = absolute_spec(d["output_dir"], base)


def _check_paths_exist(cfg: JobConfig) -> list[str]:
    """The local files a job reads, found as the job finds them: the trajectory file and every checkpoint it
    names (no weights are read), the listed checkpoints, the local shard specs (expanded: each must match a
    shard). fsspec URLs are left for the job, so validation needs no network."""
    from pruner.io.shards import expand_shard_specs
    from pruner.model.checkpoints import existing_checkpoint, load_trajectory

    problems = []
    if cfg.trajectory.file:
        try:
            load_trajectory(file=cfg.trajectory.file)
        except (OSError, ValueError) as e:
            problems.append(f"  trajectory.file: {e}")
    for i, c in enumerate(cfg.trajectory.checkpoints):
        try:
            existing_checkpoint(c)
        except FileNotFoundError as e:
            problems.append(f"  trajectory.checkpoints.{i}: {e}")
    if cfg.model.config_file and not Path(cfg.model.config_file).exists():
        problems.append(f"  model.config_file: {cfg.model.config_file} does not exist")
    for section in ("data", "target"):
        for i, s in enumerate(getattr(cfg, section).shards):
            if s.startswith("pipe:") and not cfg.data.allow_pipe:
                problems.append(f"  {section}.shards.{i}: pipe: URLs execute shell commands and are refused "
                                f"(fix: set data.allow_pipe: true if you trust this config)")
            elif "://" not in s and not s.startswith("pipe:"):
                try:
                    expand_shard_specs([s])
                except ValueError as e:
                    problems.append(f"  {section}.shards.{i}: {e}")
    return problems


def check_checkpoint_weights(cfg: JobConfig) -> None:
    """The pre-flight check of ``validate-config`` and ``pruner prune``, after :func:`load_config`: every checkpoint
    of the trajectory is read once, and must load without executing code (``weights_only``), hold finite weights and
    fit the architecture the scorer will build (the trajectory file's record, else ``model.arch``). Raises
    :class:`ConfigError` naming each bad file and the fix, so a bad checkpoint stops a job before any Ray work or
    job directory (pruner.model.checkpoints.check_checkpoints). Imports torch; ``load_config`` alone does not."""
    from pruner.model.checkpoints import check_checkpoints, load_trajectory
    key = "trajectory.file" if cfg.trajectory.file else "trajectory.checkpoints"
    try:
        traj = load_trajectory(file=cfg.trajectory.file, checkpoints=cfg.trajectory.checkpoints or None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"invalid job config: \n  {key}: {e}") from None
    problems = check_checkpoints(traj, traj.arch or cfg.model.arch, cfg.model.config_file or traj.config_file)
    if problems:
        raise ConfigError("\n".join(["invalid job config: a checkpoint cannot be scored"] +
                                     [f"  {key}: {p}" for p in problems]))


#: Keys whose default changed after job directories were written without them, with the value that reproduces
#: what such a job did: its stored features were made with the Kronecker sketch everywhere, its base
#: components came from a pass at theta_t, its Diff-In scores are the taylor form, and it selected without a filter
#: stage. Applied only when re-opening a job (:func:`load_job_config`).
JOB_LEGACY_DEFAULTS = {"features.single_token_k": 0, "features.single_token_direct": False,
                       "scores.diffin.base_pass": "exact", "scores.diffin.form": "taylor",
                       "select.filter_score": None, "select.niche_alpha": None}


def load_job_config(path: str | Path) -> JobConfig:
    """The ``config.yaml`` of an existing job directory (pruner rescore / explain), with
    :data:`JOB_LEGACY_DEFAULTS` for keys it does not have, so stored features are extended with the same sketch."""
    return load_config(path, check_paths=False, defaults=JOB_LEGACY_DEFAULTS)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, check_paths: bool = True, defaults: dict | None = None) -> JobConfig:
    """Load and validate a job config from a YAML file (or a dict), applying ``key.path=value`` overrides.
    ``defaults`` ({dotted key: value}) fill keys the file does not set, before validation."""
    source = str(path) if path else "<dict>"
    if data is None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        base = p.resolve().parent
    else:
        data = json.loads(json.dumps(data))
        base = Path.cwd()
    for dotted, value in (defaults or {}).items():
        *sections, leaf = dotted.split(".")
        section, _ = _section(data, sections)
        if section is not None:  # a non-mapping is left for validation to report
            section.setdefault(leaf, value)
    for o in overrides or []:
        apply_override(data, o)
    _resolve_paths(data, base)
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if check_paths:
        problems = _check_paths_exist(cfg)
        if problems:
            raise ConfigError("\n".join([f"invalid job config {source}:"] + problems))
    return cfg
