"""``pruner explain``: the training pairs behind a TracIn score (proponents and opponents of a query).

For a query q and a pool sample z, TracIn(z, q) = sum_i eta_i <P g_i(q), P g_i(z)> over the job's checkpoints
(methods §2.1; positive = training on z lowers q's loss = proponent, negative = opponent). The pool side is the
stored features (``shards/<id>.c<i>.npy``); the query side is computed with the job's own models, projection and
loss (:class:`QueryEncoder`), so a query equal to a pool pair reproduces that pair's stored features. The query
vector ``concat_i sqrt(eta_i) P g_i(q)`` is searched by maximum inner product
(:class:`~pruner.explain.index.PoolIndex`); opponents are the top hits of the negated query. Queries:

* a pair: an image file and a caption;
* a pool sample by uid (its stored vector; no model pass);
* the job's target set (``--job-target``): ``P v_target,i`` from ``shared/ckpt-<i>.pt``, the projected mean target
  gradient the job's ``tracin_target`` column was scored against (exact dots there, projected dots here). Since the
  target loss is a mean of per-sample bank losses, v_target is the mean of the per-sample target gradients, and P
  is linear, so this equals the mean of the target samples' projected gradients without another model pass;
* another target WebDataset (``--target SPEC``): the mean of its samples' projected gradients (the first
  ``max_samples`` in sorted shard order), computed in streaming batches. By linearity it equals the projected mean
  target gradient, and it needs no parameter-sized vector (no extra memory beyond one batch). Explaining a mean
  ranks the pool exactly as ``tracin_target`` would for that target set.

Output: a dict listing per hit: role, rank, uid, key, shard_url, row, score, caption (read from the shard;
``captions=False`` skips that). It is saved atomically as ``<job>/explain/results/<query id>.json``
(:func:`query_id`: the same query again replaces its file), which ``pruner report`` shows with thumbnails; with
``out`` also as a JSON file plus a CSV beside it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from pruner.explain.index import PoolIndex
from pruner.explain.pool import PoolFeatures, read_captions, weight_blocks
from pruner.io.atomic import write_bytes_atomic, write_json_atomic
from pruner.io.layout import JobLayout
from pruner.io.shards import RejectLog, Sample, expand_shard_specs, iter_shard
from pruner.io.store import save_features
from pruner.jobfiles import JobFiles
from pruner.model.loss import encode_pairs
from pruner.scorer import Scorer
from pruner.scores.shared import CheckpointShared

CSV_COLUMNS = ("role", "rank", "uid", "key", "shard_url", "row", "score", "caption")


class QueryEncoder:
    """Projected per-sample gradients of new pairs at every checkpoint of a finished job, with the job's models
    (Scorer built from its config.yaml and trajectory), projection seeds, precision and bank loss (shared/ckpt-*.pt).

    Memory: the models, the per-checkpoint banks and G (CheckpointScorer needs its norm); the other shared
    parameter-space vectors stay memory-mapped and are read only for :meth:`job_target_blocks`.
    """

    def __init__(self, job_dir: str | Path, device: str = "auto"):
        job = JobFiles(job_dir)
        self.layout, cfg = job.layout, job.config
        if cfg.features.loss != "bank":
            raise ValueError(f"{self.layout.config}: features.loss is {cfg.features.loss!r}; a single query pair has "
                             f"no batch-mates, so only jobs scored with the bank loss can be explained")
        traj = job.trajectory()
        job.require_shared(len(traj.checkpoints))  # all named, before any model loads
        # only the features are needed: no Diff-In directions, so no parameter-sized vectors beyond G
        lean = cfg.model_copy(update={"scores": cfg.scores.model_copy(update={"methods": ["tracin"]})})
        self.cfg = cfg
        self.scorer = Scorer(lean, traj, device)
        self.states = [job.shared_state(i, mmap=True) for i in range(len(traj.checkpoints))]
        self.etas = job.etas()  # the pool's weights (trajectory.json), not the linked states'
        dev = self.scorer.device
        self.scorer.set_shared([CheckpointShared.from_state({**s, "vectors": {"G": s["vectors"]["G"]}}, dev)
                                for s in self.states])

    @property
    def k(self) -> int:
        return self.cfg.features.k

    def blocks(self, samples: Sequence[Sample], batch_size: Optional[int] = None) -> list[np.ndarray]:
        """Per checkpoint, float32 [n, k] projected gradients of ``samples`` (the stored features' definition)."""
        out: list[list[np.ndarray]] = [[] for _ in self.scorer.engines]
        for images, tokens, uids in self.scorer.uid_batches(samples, batch_size):
            for i, (eng, sc) in enumerate(zip(self.scorer.engines, self.scorer.scorers)):
                r = eng.run(images, tokens, sc.loss_fn(uids), features=True, norms=False)
                out[i].append(r.features.detach().cpu().numpy().astype(np.float32))
        return [np.concatenate(o) if o else np.zeros((0, self.k), np.float32) for o in out]

    def vectors(self, samples: Sequence[Sample]) -> np.ndarray:
        """float32 [n, m k]: concat_i sqrt(eta_i) P g_i(z) per sample."""
        return weight_blocks(self.blocks(samples), self.etas, "tracin")

    def job_target_blocks(self) -> list[np.ndarray]:
        """Per checkpoint, float32 [1, k]: P v_target,i (the job's projected mean target gradient)."""
        out = []
        for i, (s, eng) in enumerate(zip(self.states, self.scorer.engines)):
            v = s["vectors"].get("v_target")
            if v is None:
                raise ValueError(f"{self.layout.shared(i)} holds no v_target: the job had no target set "
                                 f"(fix: pass --target SHARDS)")
            with torch.no_grad():
                p = eng.projector.project_weights({n: t.to(eng.device) for n, t in v.items()})
            out.append(p.detach().cpu().numpy().reshape(1, -1).astype(np.float32))
        return out

    def target_blocks(self, specs: Sequence[str], max_samples: Optional[int] = None,
                      allow_pipe: bool = False) -> tuple[list[np.ndarray], int]:
        """(per checkpoint float32 [1, k] mean projected gradient, samples used) over the first ``max_samples``
        (default: the job's target.max_samples) samples of a WebDataset, in streaming batches."""
        limit = max_samples or self.cfg.target.max_samples
        bs = self.cfg.features.batch_size
        sums = [np.zeros(self.k, np.float64) for _ in self.scorer.engines]
        n, batch, rejects = 0, [], RejectLog()

        def flush():
            for i, b in enumerate(self.blocks(batch)):
                sums[i] += b.astype(np.float64).sum(0)

        for url in expand_shard_specs(list(specs), allow_pipe):
            for s in iter_shard(url, rejects, allow_pipe=allow_pipe):
                if n >= limit:
                    break
                batch.append(s)
                n += 1
                if len(batch) == bs:
                    flush()
                    batch = []
            if n >= limit:
                break
        if batch:
            flush()
        if n == 0:
            raise ValueError(f"target {list(specs)} holds no readable sample")
        return [(s / n).astype(np.float32).reshape(1, -1) for s in sums], n


def pool_embeddings(job_dir: str | Path, encoder: Optional[QueryEncoder] = None, batch_size: Optional[int] = None,
                    device: str = "auto") -> list[Path]:
    """CLIP embeddings of every pool sample at the job's last checkpoint, for near-duplicate search in embedding
    space: per score file ``<job>/explain/embeddings/<shard id>.npy``, fp16 [n_shard, 2e], row-aligned with it,
    each row ``[image embedding, text embedding] / sqrt(2)`` (unit-norm halves, so the row is unit-norm and the
    cosine of two rows is the mean of the image and text cosines). Files already present with the right row count
    are kept. Costs one forward pass over the pool (shards re-read in score-file order; their keys must match)."""
    root = Path(job_dir)
    layout = JobLayout(root)
    paths, pipes = [], JobFiles(root).trusted_pipes()
    for f in layout.score_files():
        n = pq.read_metadata(f).num_rows
        if n == 0:
            continue
        out = layout.embedding_file(f)
        paths.append(out)
        if out.exists() and np.load(out, mmap_mode="r").shape[0] == n:
            continue
        encoder = encoder or QueryEncoder(root, device)
        cfg, sc = encoder.cfg, encoder.scorer
        t = pq.read_table(f, columns=["key", "shard_url"])
        url = t["shard_url"][0].as_py()
        samples = list(iter_shard(url, RejectLog(), allow_pipe=url in pipes,
                                  max_samples=cfg.data.max_samples_per_shard))
        if [s.key for s in samples] != t["key"].to_pylist():
            raise ValueError(f"{url} no longer holds the samples scored in {f} (keys differ)")
        model = sc.engines[-1].model
        parts = []
        with torch.no_grad():
            for images, tokens in sc.batches(samples, batch_size):
                img, txt = encode_pairs(model, images.to(sc.device), tokens.to(sc.device))
                parts.append((torch.cat([img.float(), txt.float()], 1) / np.sqrt(2.0)).cpu().numpy())
        save_features(out, np.concatenate(parts))
    return paths


def pair_sample(image: str | Path, caption: str) -> Sample:
    """A query pair from an image file and a caption (decoded as the shard reader decodes images)."""
    with Image.open(image) as im:
        im.load()
        rgb = im.convert("RGB")
    caption = caption.strip()
    if not caption:
        raise ValueError("the query caption is empty")
    return Sample(url=str(image), key=Path(image).stem, uid=f"query/{Path(image).name}", image=rgb,
                  caption=caption, meta={})


def find_uid(pool: PoolFeatures, uid: str) -> int:
    """The sample id of ``uid`` in the pool (ValueError if absent)."""
    hits = np.flatnonzero(pc.equal(pool.column("uid"), uid).to_numpy(zero_copy_only=False))
    if not hits.size:
        raise ValueError(f"uid {uid!r} is not in the pool of {pool.root}")
    return int(hits[0])


def query_id(query: dict) -> str:
    """A file-name-safe id of a query: its type and a digest of what defines it (a pair: the image file's bytes
    and the caption; a pool sample: its uid; a target: its shard specs and sample count)."""
    if query["type"] == "job_target":
        return "job_target"
    h = hashlib.sha256()
    if query["type"] == "pair":
        h.update(Path(query["image"]).read_bytes())
    h.update(json.dumps({k: query[k] for k in ("caption", "uid", "shards", "samples") if k in query},
                        sort_keys=True).encode())
    return f"{query['type']}-{h.hexdigest()[:16]}"


def _hits(role: str, index: PoolIndex, scores: np.ndarray, ids: np.ndarray, captions: bool,
          pipes: frozenset[str]) -> list[dict]:
    keep = ids >= 0
    recs = index.pool.records(ids[keep])
    caps = read_captions(recs, pipes) if captions else [None] * len(recs)
    return [{"role": role, "rank": r, **rec, "score": float(s), "caption": c, "id": int(i)}
            for r, (rec, s, c, i) in enumerate(zip(recs, scores[keep], caps, ids[keep]))]


def explain(job_dir: str | Path, *, image: Optional[str] = None, caption: Optional[str] = None,
            uid: Optional[str] = None, target: Optional[Sequence[str]] = None, job_target: bool = False,
            k: int = 10, kind: str = "auto", nprobe: Optional[int] = None, nlist: Optional[int] = None,
            rerank: Optional[int] = None, max_target_samples: Optional[int] = None, captions: bool = True,
            device: str = "auto", rebuild_index: bool = False, out: Optional[str | Path] = None,
            encoder: Optional[QueryEncoder] = None, index: Optional[PoolIndex] = None) -> dict:
    """Top-k proponents and opponents of one query (exactly one of: image + caption, uid, target, job_target).
    Returns the result dict, saved as ``result["saved"]`` (``<job>/explain/results/<query id>.json``); with
    ``out`` also written as JSON (``out``) and CSV (``out`` with .csv)."""
    modes = [image is not None or caption is not None, uid is not None, bool(target), job_target]
    if sum(modes) != 1 or (modes[0] and (image is None or caption is None)):
        raise ValueError("give exactly one query: image and caption, uid, target shards, or job_target")
    index = index or PoolIndex.open(job_dir, kind, rebuild=rebuild_index, nprobe=nprobe, nlist=nlist)
    needs_model = modes[0] or modes[2] or modes[3]
    if needs_model and encoder is None:
        encoder = QueryEncoder(job_dir, device)
    if modes[0]:
        sample = pair_sample(image, caption)
        q = encoder.vectors([sample])
        query = {"type": "pair", "image": str(Path(image).resolve()), "caption": sample.caption}
    elif modes[1]:
        i = find_uid(index.pool, uid)
        q = index.pool.gather([i])
        query = {"type": "pool_sample", **index.pool.records([i], ("uid", "key", "shard_url"))[0]}
    elif modes[2]:
        blocks, n = encoder.target_blocks(target, max_target_samples, encoder.cfg.data.allow_pipe)
        q = weight_blocks(blocks, encoder.etas, "tracin")
        query = {"type": "target", "shards": list(target), "samples": n,
                 "vector": "mean of the target samples' projected gradients (= projected mean target gradient)"}
    else:
        q = weight_blocks(encoder.job_target_blocks(), encoder.etas, "tracin")
        query = {"type": "job_target", "vector": "projected v_target of shared/ckpt-<i>.pt (the job's target set)"}
    pro_s, pro_i = index.search(q, k, rerank)
    opp_s, opp_i = index.search(-q, k, rerank)
    pipes = JobFiles(job_dir).trusted_pipes() if captions else frozenset()
    query["id"] = query_id(query)
    result = {
        "job": str(Path(job_dir)), "query": query, "k": int(k),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score": "TracIn(z, q) = sum_i eta_i <P g_i(q), P g_i(z)> over the stored projected gradients",
        "etas": index.pool.etas, "query_norm": float(np.linalg.norm(q)),
        "index": {"kind": index.params.kind, **index.params.as_dict(), "n": index.pool.n, "dim": index.pool.dim,
                  "loaded_from_cache": bool(index.meta.get("loaded"))},
        "proponents": _hits("proponent", index, pro_s[0], pro_i[0], captions, pipes),
        "opponents": _hits("opponent", index, -opp_s[0], opp_i[0], captions, pipes),
    }
    result["saved"] = str(JobLayout(Path(job_dir)).explain_result(query["id"]))
    write_json_atomic(result["saved"], result)
    if out is not None:
        write_result(result, out)
    return result


def write_result(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``out`` (JSON) and ``out`` with suffix .csv (one row per hit: CSV_COLUMNS), both written atomically."""
    out = Path(out)
    csv_path = out.with_suffix(".csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for h in result["proponents"] + result["opponents"]:
        w.writerow(h)
    write_json_atomic(out, result)
    write_bytes_atomic(csv_path, buf.getvalue().encode())
    return out, csv_path
