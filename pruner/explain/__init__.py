"""Explaining scores and diversifying coresets with the stored projected gradients (TracIn, methods §2).

* :mod:`pruner.explain.pool`: a job's features as one memory-mapped matrix ("tracin" and "unit" views).
* :mod:`pruner.explain.index`: faiss inner-product indexes over them (flat / IVF-Flat / IVF-PQ, GPU when present).
* :mod:`pruner.explain.query`: ``pruner explain``, proponents and opponents of a pair, pool sample or target set.
* :mod:`pruner.explain.cluster`: ``pruner cluster``, spherical k-means in gradient space (clusters.parquet/json).

Selection policies that use them live in :mod:`pruner.select.policies`.
"""
