"""The one definition of a job's output directory and of shard identities (reading its files:
pruner.jobfiles.JobFiles).

    <output_dir>/<job name>-<job id>/
        config.yaml                 the resolved config that produced this directory (select: the last applied)
        trajectory.json             checkpoints used (path, step, lr, lr_mean, file sha256, updates, eta, a_t, b_t)
        shared/ckpt-<i>.pt          per-checkpoint shared vectors (bank, v_t, G_B, u_t), weights_only tensors
        shared/inputs.json          sha256 of the uids of the hash-picked bank, reference, target, OGA samples
        shards/<shard id>.parquet   per-shard scores (one row per accepted sample); its Parquet metadata records
                                    the identity of the shard file it was scored from (:func:`shard_identities`)
        shards/<shard id>.c<i>.npy  optional fp16 projected gradients [n, k] at checkpoint i, row-aligned
        shards/<shard id>.c<i>.hzg.npy  optional fp16 projected H_z G_B [n, k] (re-targeting the taylor form)
        shards/<shard id>.rejects.parquet   samples the reader skipped, with reasons
        ranking.parquet             every sample, all scores and its rank
        keep/                       manifests: manifest.json, uids.npy, keep.parquet
        summary.json
        duplicates.parquet          samples left out because an earlier shard holds their uid (reject duplicate_uid)
        .reduce/                    the reduce step's outputs while they are written (moved into place when complete)
        job.lock                    held (flock) by the process writing the directory, shared by those reading it
        logs/run.log                every run's log at INFO, the libraries' lines included (the console shows less)
        explain/results/<query id>.json   the latest `pruner explain` result per query (shown by `pruner report`)
        clusters.parquet, clusters.json   `pruner cluster`: each sample's gradient cluster; per-cluster summaries
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import fsspec
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: the score file's Parquet metadata key holding the identity of the shard it was scored from
IDENTITY_KEY = b"pruner.shard_identity"
#: the fields of fsspec's file info that tell one version of a shard file from another: size and modification time
#: (local and network filesystems), ETag / LastModified / VersionId (S3, HTTP), generation / md5Hash / crc32c (GCS),
#: etag / last_modified (Azure)
IDENTITY_FIELDS = ("size", "mtime", "ETag", "LastModified", "VersionId", "generation", "md5Hash", "crc32c", "etag",
                   "last_modified")


def shard_id(url: str) -> str:
    """A filesystem-safe, stable id for a shard URL: ``<basename without extension>-<sha1(url)[:10]>``."""
    base = posixpath.basename(url.rstrip("/")) or "shard"
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:80]
    return f"{safe}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"


CLUSTERS_PARQUET = "clusters.parquet"
CLUSTERS_JSON = "clusters.json"


class JobLockedError(RuntimeError):
    """Another process holds the job directory's lock (:meth:`JobLayout.locked`)."""


class JobRefusedError(ValueError):
    """The job directory cannot be resumed as asked; the message names the cause and the fix."""


def shard_identities(urls: Sequence[str]) -> dict[str, str | None]:
    """Each shard's identity: the :data:`IDENTITY_FIELDS` of its fsspec file info, as JSON. A shard re-written
    since (re-downloaded, repaired) has another one. Shards are listed a folder at a time (one listing call per
    folder on an object store, not one per shard). None for ``pipe:`` URLs and vanished files (not compared)."""
    out: dict[str, str | None] = {}
    folders: dict[tuple, list[tuple[str, str]]] = {}
    for url in urls:
        if url.startswith("pipe:"):
            out[url] = None
            continue
        fs, path = fsspec.core.url_to_fs(url)
        folders.setdefault((fs, path.rsplit("/", 1)[0]), []).append((url, path))
    for (fs, folder), members in folders.items():
        fs.invalidate_cache(folder)  # a listing cached earlier in this process would show the old versions
        try:
            listing = {e["name"].rstrip("/"): e for e in fs.ls(folder, detail=True)}
        except (OSError, NotImplementedError, ValueError):  # a filesystem that cannot list (plain HTTP)
            listing = {}
        for url, path in members:
            try:
                info = listing.get(path) or fs.info(path)
            except FileNotFoundError:
                out[url] = None
                continue
            out[url] = json.dumps({k: info[k] for k in IDENTITY_FIELDS if k in info}, sort_keys=True, default=str)
    return out


@dataclass(frozen=True)
class JobLayout:
    root: Path

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def shared_dir(self) -> Path:
        return self.root / "shared"

    @property
    def keep_dir(self) -> Path:
        return self.root / "keep"

    def scores(self, url: str) -> Path:
        return self.shards_dir / f"{shard_id(url)}.parquet"

    def scored_identity(self, url: str) -> str | None:
        """The identity (:func:`shard_identities`) of the shard file its score file was scored from; None if that
        was not recorded (scored before identities were, or a ``pipe:`` URL)."""
        value = (pq.read_schema(self.scores(url)).metadata or {}).get(IDENTITY_KEY)
        return value.decode() if value is not None else None

    def stale_shards(self, pool: Sequence[str], identities: dict[str, str | None]) -> tuple[list[str], list[str]]:
        """(the shards of ``pool`` without a score file, those whose score file records another identity than the
        shard now has, per ``identities``); a shard without an identity on either side counts as unchanged."""
        unscored = [u for u in pool if not self.scores(u).exists()]
        done = set(pool) - set(unscored)
        changed = [u for u in pool if u in done and identities[u] is not None
                   and self.scored_identity(u) not in (None, identities[u])]
        return unscored, changed

    def score_files(self) -> list[Path]:
        """The per-shard score files ``shards/*.parquet`` (``*.rejects.parquet`` excluded), sorted by name: the
        order every reader of a job's scores uses, so row positions mean the same to all of them."""
        return sorted(p for p in self.shards_dir.glob("*.parquet") if not p.name.endswith(".rejects.parquet"))

    def rejects(self, url: str) -> Path:
        return self.shards_dir / f"{shard_id(url)}.rejects.parquet"

    def features(self, url: str, checkpoint: int) -> Path:
        return self.shards_dir / f"{shard_id(url)}.c{checkpoint}.npy"

    @property
    def int8_dir(self) -> Path:
        """int8 copies of the features files, made by ``pruner rescore --target`` (pruner.io.store.Int8Copies)."""
        return self.root / "int8"

    def hzg(self, url: str, checkpoint: int) -> Path:
        """fp16 projected Hessian-gradient products P H_z G_B [n, k] (``features.save_hzg``)."""
        return self.shards_dir / f"{shard_id(url)}.c{checkpoint}.hzg.npy"

    def shared(self, checkpoint: int) -> Path:
        return self.shared_dir / f"ckpt-{checkpoint}.pt"

    @property
    def shared_inputs(self) -> Path:
        return self.shared_dir / "inputs.json"

    @property
    def ranking(self) -> Path:
        return self.root / "ranking.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def log_file(self) -> Path:
        """The driver's log of every run, libraries' INFO lines included (pruner.logs.log_file)."""
        return self.root / "logs" / "run.log"

    @property
    def reduce_staging(self) -> Path:
        """Where the reduce step writes the ranking and keep set before moving them into place (pruner.select.reduce)."""
        return self.root / ".reduce"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / "job.lock"

    def check_unlocked(self) -> None:
        """Raise :class:`JobLockedError` at once if another process holds the job directory's lock (the fast refusal
        of a second driver, before it loads anything; :meth:`locked` still takes the lock for the run). Creates
        nothing: a directory or lock file that does not exist yet is not locked."""
        if not self.lock.exists():
            return
        with self.locked():
            pass

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True) -> Iterator[None]:
        """Hold the job directory's lock file while the block runs: exclusively to write the directory (a prune
        job's driver), shared to read it (the job an extension builds on). ``flock`` on ``job.lock``, released
        when the block ends or the process dies however it dies (the file stays and is never written), and held
        across nodes on NFS. Raises :class:`JobLockedError` naming the file and the fix when another process holds
        it in a conflicting mode; on a filesystem without locks it warns and goes on unlocked."""
        with open(self.lock, "a") as fh:  # created if missing; appending nothing leaves it (and its mtime) alone
            try:
                fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobLockedError(
                    f"another pruner process is using the job directory {self.root}: it holds the lock {self.lock} "
                    f"(e.g. an earlier scheduled run whose `ray job submit` client was stopped while the Ray job "
                    f"kept running). Fix: wait for it to finish, or stop it (`ray job list`, `ray job stop <id>`), "
                    f"then re-run") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning("cannot lock %s (%s): another run on this job directory at the same time is not "
                            "prevented", self.lock, e)
            yield

    @property
    def trajectory(self) -> Path:
        return self.root / "trajectory.json"

    @property
    def explain_results(self) -> Path:
        """The folder of saved ``pruner explain`` results, one ``<query id>.json`` per query."""
        return self.explain_dir / "results"

    @property
    def explain_dir(self) -> Path:
        """``pruner explain``'s folder: faiss indexes, saved results, pool embeddings."""
        return self.root / "explain"

    @property
    def embeddings_dir(self) -> Path:
        """Pool CLIP embeddings for near-duplicate search, one ``<shard id>.npy`` per score file."""
        return self.explain_dir / "embeddings"

    def embedding_file(self, score_file: Path) -> Path:
        """The pool embeddings row-aligned with one score file (``<shard id>.npy``)."""
        return self.embeddings_dir / f"{Path(score_file).stem}.npy"

    def index_files(self, kind: str) -> tuple[Path, Path]:
        """(faiss index, its metadata JSON) of ``pruner explain``'s index of this kind."""
        return self.explain_dir / f"index-{kind}.faiss", self.explain_dir / f"index-{kind}.json"

    def explain_result(self, query_id: str) -> Path:
        """A saved ``pruner explain`` result."""
        return self.explain_results / f"{query_id}.json"

    @property
    def oga_subsample(self) -> Path:
        """The OGA forest's subsample features (last checkpoint), kept so a resumed job refits the same forest."""
        return self.shared_dir / "oga_subsample.npy"

    @property
    def clusters_table(self) -> Path:
        """``pruner cluster``'s per-sample cluster ids and cosines (:mod:`pruner.explain.cluster`)."""
        return self.root / CLUSTERS_PARQUET

    @property
    def duplicates(self) -> Path:
        """The samples left out because an earlier shard holds their uid (written by the reduce step)."""
        return self.root / "duplicates.parquet"

    @property
    def failed(self) -> Path:
        """The shards that failed after their retries, with clean messages and tracebacks apart."""
        return self.root / "failed.json"

    @property
    def report(self) -> Path:
        """``pruner report``'s default output."""
        return self.root / "report.html"

    @property
    def filtered_dir(self) -> Path:
        """In the reduce step's staging folder: the score files restricted to the filter stage's survivors."""
        return self.root / "filtered"

    def retarget(self, tag: str) -> "JobLayout":
        """The job directory of a re-target of this job (``pruner rescore --target``), inside it."""
        return JobLayout(self.root / f"retarget-{tag}")

    @property
    def clusters_summary(self) -> Path:
        """``pruner cluster``'s per-cluster summaries (:mod:`pruner.explain.cluster`)."""
        return self.root / CLUSTERS_JSON
