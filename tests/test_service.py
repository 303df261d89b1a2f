"""The prune service end to end on real Ray clusters: resume, idempotency, actor and driver kills, node loss,
determinism, failing shards, `ray job submit`, and the Ray metrics.

Everything is real: `ray start` clusters bound to 127.0.0.1, the pruner-micro trajectory of the `micro_trajectory`
fixture, tar shards re-packed from the demo pool (8 shards x 40 samples, member bytes unchanged), Parquet outputs.

Clusters: every `ray start` runs in its own session (setsid) with every port picked free, a short temp dir
(`/tmp/r*`: Ray's socket paths must stay under 108 characters) and is torn down by killing exactly the processes
of that session and their descendants. Never `ray stop`: it stops every Ray instance on the machine, including
other people's. One head (2 CPUs, dashboard on loopback for the Jobs API and the metrics export) serves the
module; the node-loss test starts its own two-node cluster (both nodes on 127.0.0.1; see _JOIN_ON_LOOPBACK for
why the second node's `ray start` runs through a small wrapper). The test process itself is connected to the module
head as a driver for the in-process runs (`pruner.jobs.prune.run`); drivers that are killed or must report an exit
status run as subprocesses (`python -m pruner.jobs.prune`) joining the same cluster via RAY_ADDRESS.

Kills happen at natural points: once the job directory holds some shard results while other shards are in flight
(a scoring actor's process title is ``ray::ShardScorer.score_shard`` while it scores).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import small_job_config
from corpus import write_shard
from pruner.config import load_config
from pruner.jobs.jobdir import prepare
from pruner.io.layout import JobLayout
from pruner.io.manifests import load_uid_npy
from pruner.io.shards import demo_pool_shards, read_shard

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, and `python` for job entrypoints
N_SHARDS, PER_SHARD = 8, 40
JOB_TIMEOUT = 420


# -- clusters ----------------------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# `ray start --address` refuses to join a cluster while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with =1 Ray rewrites
# 127.0.0.1 into the machine's external address (so the node would bind and dial off loopback). This runs the real
# `ray start` command with only the CLI's own multi-node check seeing the switch on; address resolution keeps it off.
_JOIN_ON_LOOPBACK = """
import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as cli
cli.ray_constants = types.SimpleNamespace(**{**vars(rc), "ENABLE_RAY_CLUSTER": True})
sys.exit(cli.main())
"""


class RayNode:
    """One `ray start` node in its own session; ``kill()`` ends exactly its processes (a node crash)."""

    def __init__(self, num_cpus: int, head_address: str | None = None, dashboard: bool = False,
                 env: dict | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
        port, client, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, dash, mon, dmon = free_ports(11)
        self.metrics_port = metrics
        command = [str(BIN / "ray")] if head_address is None else [sys.executable, "-c", _JOIN_ON_LOOPBACK]
        args = command + ["start", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
        if head_address is None:
            self.address = f"127.0.0.1:{port}"
            args += ["--head", f"--port={port}", f"--ray-client-server-port={client}"]
            args += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
                     if dashboard else ["--include-dashboard=false"])
            self.dashboard_url = f"http://127.0.0.1:{dash}" if dashboard else None
        else:
            self.address = head_address
            args += [f"--address={head_address}"]
        log = Path(self.temp_dir) / "ray-start.log"
        with open(log, "wb") as fh:
            # the autoscaler's and the dashboard's own metrics ports default to fixed numbers: pick free ones too
            env = ray_env(AUTOSCALER_METRIC_PORT=str(mon), DASHBOARD_METRIC_PORT=str(dmon), **(env or {}))
            proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.temp_dir)
        self.sid = proc.pid  # every daemon (and, through the raylet, every worker) of this node keeps this session
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            text = log.read_text(errors="replace")
            self.stop()
            raise RuntimeError(f"ray start failed ({rc}):\n{text[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        found = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid:
                    found[p.pid] = p
                    for c in p.children(recursive=True):  # e.g. job entrypoints, which start their own session
                        found[c.pid] = c
            except (psutil.Error, OSError):
                pass
        return list(found.values())

    def busy_scorers(self) -> list[psutil.Process]:
        """This node's ShardScorer workers that are scoring a shard right now."""
        out = []
        for p in self.processes():
            try:
                if " ".join(p.cmdline()).startswith("ray::ShardScorer.score_shard"):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def kill(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=15)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# -- data, configs, checks -----------------------------------------------------------------------------------------

def repack_demo_pool(out: Path, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD) -> list[Path]:
    """The first n_shards * per_shard demo pool samples as uncompressed shards pool-00000{0..}.tar (same bytes)."""
    samples = []
    for url in demo_pool_shards():
        with tarfile.open(url) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tf.extractfile(m).read()
    assert len(samples) >= n_shards * per_shard
    return [write_shard(out / f"pool-{i:06d}.tar", samples[i * per_shard:(i + 1) * per_shard])
            for i in range(n_shards)]


def write_config(directory: Path, trajectory: Path, shards: list[str], **overrides) -> Path:
    cfg = small_job_config(directory, trajectory, data={"shards": [str(s) for s in shards]}, **overrides)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def job_dir(cfg_path: Path) -> Path:
    """The job directory the config maps to (pruner.jobs.jobdir.prepare; creates it, writes config.yaml)."""
    return prepare(load_config(cfg_path))[0].root


def seed_shared(root: Path, reference: Path) -> None:
    """Copy the reference job's shared quantities into a job directory of the same config: the driver's resume
    path reloads them instead of starting a SharedComputer (saves a minute under load; scores are unchanged)."""
    shutil.copytree(reference / "shared", root / "shared", dirs_exist_ok=True)


def mtimes(root: Path) -> dict[str, int]:
    """Every output file's modification time (the run log, appended by every run, is not an output)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "logs"}


def assert_complete(root: Path, pool_uids: dict[str, list[str]]) -> None:
    """Every pool sample exactly once in the ranking; keep manifests consistent with the selection and the shards."""
    summary = json.loads((root / "summary.json").read_text())
    ranking = pq.read_table(root / "ranking.parquet", columns=["uid", "key", "shard_url", "kept"]).to_pydict()
    all_uids = [u for uids in pool_uids.values() for u in uids]
    assert len(ranking["uid"]) == len(set(ranking["uid"])) == len(all_uids), "a sample is missing or counted twice"
    assert set(ranking["uid"]) == set(all_uids)
    score_rows = sum(pq.read_metadata(JobLayout(root).scores(u)).num_rows for u in pool_uids)
    assert score_rows == len(all_uids)
    assert not (root / "failed.json").exists()

    n_keep = summary["selection"]["n_keep"]
    assert summary["counts"] == {"shards": len(pool_uids), "samples": len(all_uids), "kept": n_keep,
                                 "dropped": len(all_uids) - n_keep, "rejected": 0}
    assert n_keep == sum(ranking["kept"]) == len(all_uids) // 2  # keep_fraction 0.5
    keep_dir = root / "keep"
    manifest = json.loads((keep_dir / "manifest.json").read_text())
    assert sorted(manifest) == sorted(pool_uids)
    for url, keys in manifest.items():  # every kept key exists in its shard
        shard_keys = {s.key for s in read_shard(url)[0]}
        assert set(keys) <= shard_keys and len(set(keys)) == len(keys)
    kept_rank = {(u, k, s) for u, k, s, kept in zip(ranking["uid"], ranking["key"], ranking["shard_url"],
                                                     ranking["kept"]) if kept}
    assert {(s, k) for _, k, s in kept_rank} == {(url, k) for url, keys in manifest.items() for k in keys}
    keep = pq.read_table(keep_dir / "keep.parquet").to_pydict()
    assert len(keep["uid"]) == n_keep and set(zip(keep["uid"], keep["key"], keep["shard_url"])) == kept_rank
    uids = load_uid_npy(keep_dir / "uids.npy")
    assert len(uids) == n_keep and set(uids) == {u for u, _, _ in kept_rank}


def assert_same_ranking(root: Path, reference: Path) -> None:
    """Identical ranking: uid order, every score column bit for bit, kept flags."""
    a, b = pq.read_table(root / "ranking.parquet"), pq.read_table(reference / "ranking.parquet")
    assert a.schema.names == b.schema.names
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    for name in a.schema.names:
        x, y = a.column(name).to_numpy(), b.column(name).to_numpy()
        if x.dtype.kind == "f":
            assert np.array_equal(x.view(np.uint64), y.view(np.uint64)), f"column {name} differs"
        else:
            assert (x == y).all(), f"column {name} differs"
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (root, reference))
    assert sa["selection"] == sb["selection"]


@contextlib.contextmanager
def driver_process(cfg_path: Path, address: str, log: Path):
    """`python -m pruner.jobs.prune --config cfg` as a subprocess (own process group) joining the cluster, output
    to ``log``; the group is killed on exit."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pruner.jobs.prune", "--config", str(cfg_path)],
                                env=ray_env(RAY_ADDRESS=address), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=cfg_path.parent, start_new_session=True)
        try:
            yield proc
        finally:
            _kill_group(proc)


def run_driver(cfg_path: Path, address: str, log: Path, timeout: float = JOB_TIMEOUT) -> tuple[int, str]:
    """The driver run to completion: (exit status, output)."""
    with driver_process(cfg_path, address, log) as proc:
        rc = proc.wait(timeout=timeout)
    return rc, log.read_text(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_until(predicate, timeout: float, what: str, step: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def some_shards_done(root: Path, busy_on: RayNode | None = None, driver_log: Path | None = None):
    """Once 1..N-1 shard results exist (and, with busy_on, a scorer on that node is mid-shard): the busy scorers.
    With driver_log, first check that the driver uses ``root`` (other people edit this checkout: a config schema
    change between the test's `prepare` and the driver's start would change the job id)."""
    def check():
        if driver_log is not None:
            m = re.search(r"pruner: job directory (\S+)", driver_log.read_text(errors="replace"))
            if m is None:
                return None
            assert m.group(1) == str(root), f"the driver uses {m.group(1)}, the test expected {root}"
        done = len([p for p in (root / "shards").glob("pool-*.parquet") if not p.name.endswith(".rejects.parquet")])
        if not 0 < done < N_SHARDS:
            return None
        return busy_on.busy_scorers() if busy_on is not None else True
    return check


def scrape(metrics_port: int, name: str) -> dict[str, float]:
    """{WorkerId: value} of one pruner metric in the node's Prometheus export."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(f"ray_{name}_total{{"):
            worker = re.search(r'WorkerId="([0-9a-f]+)"', line)
            out[worker.group(1) if worker else ""] = float(line.rsplit(" ", 1)[1])
    return out


def new_series(before: dict, after: dict) -> float:
    return sum(v for k, v in after.items() if k not in before)


# -- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pool")
    repack_demo_pool(d)
    return d


@pytest.fixture(scope="module")
def pool_uids(pool) -> dict[str, list[str]]:
    return {str(p): [s.uid for s in read_shard(str(p))[0]] for p in sorted(pool.glob("*.tar"))}


@pytest.fixture(scope="module")
def head():
    node = RayNode(num_cpus=2, dashboard=True)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def connected(head):
    """This process joined to the module head as a driver, for in-process runs of the job."""
    import ray
    ray.init(address=head.address, configure_logging=False)
    try:
        yield head
    finally:
        ray.shutdown()


@dataclass
class Job:
    cfg_path: Path
    root: Path


@pytest.fixture(scope="module")
def reference(connected, pool, micro_trajectory, tmp_path_factory) -> Job:
    """An undisturbed run: 2 actors, the pool given as a directory."""
    from pruner.jobs.prune import run
    cfg_path = write_config(tmp_path_factory.mktemp("reference"), micro_trajectory, [pool])
    status, summary = run(load_config(cfg_path))
    assert status == 0
    root = job_dir(cfg_path)
    assert summary["job"] == root.name and summary["run"]["failed_attempts"] == {}
    return Job(cfg_path, root)


# -- tests -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_job_submit_to_cluster(head, reference, pool, pool_uids, micro_trajectory, tmp_path):
    """`ray job submit` with the repository as the working dir: completes, correct manifests, the reference
    ranking, and the actors' metrics in the node's Prometheus export (what the dashboard shows)."""
    cfg_path = write_config(tmp_path, micro_trajectory, [pool])
    before = {m: scrape(head.metrics_port, m) for m in ("pruner_samples_scored", "pruner_shards_done")}
    runtime_env = {"excludes": [".venv/", ".git/", "runs/", ".pytest_cache/", ".whl/", ".gl/", "build/",
                                "notebooks/", "**/__pycache__/"]}
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir",
                           str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
                           "python", "-m", "pruner.jobs.prune", "--config", str(cfg_path)],
                          env=ray_env(), cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out and "pruner: kept 160 of 320 samples" in out
    root = job_dir(cfg_path)
    assert_complete(root, pool_uids)
    assert_same_ranking(root, reference.root)

    def counted():
        now = {m: scrape(head.metrics_port, m) for m in before}
        got = {m: new_series(before[m], now[m]) for m in before}
        return got if got == {"pruner_samples_scored": 320, "pruner_shards_done": N_SHARDS} else None
    wait_until(counted, 60, "the job's samples and shards in the metrics export", step=1)


def test_actor_killed_mid_shard(connected, reference, pool, pool_uids, micro_trajectory, tmp_path):
    """SIGKILL a ShardScorer while it scores: Ray restarts it, the shard is retried, the result is unchanged."""
    from pruner.jobs.prune import run
    cfg_path = write_config(tmp_path, micro_trajectory, [pool])
    root = job_dir(cfg_path)
    seed_shared(root, reference.root)
    killed, stop = [], threading.Event()

    def killer():
        check = some_shards_done(root, busy_on=connected)
        while not stop.is_set() and not killed:
            busy = check()
            if busy:
                busy[0].kill()
                killed.append(busy[0].pid)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        status, summary = run(load_config(cfg_path))
    finally:
        stop.set()
        thread.join()
    assert killed, "no scoring actor was caught mid-shard"
    assert status == 0
    attempts = summary["run"]["failed_attempts"]
    assert list(attempts.values()) == [1], attempts  # exactly the shard the killed actor was scoring, retried once
    assert_complete(root, pool_uids)
    assert_same_ranking(root, reference.root)


@pytest.mark.slow
def test_driver_killed_then_rerun(head, reference, pool, pool_uids, micro_trajectory, tmp_path):
    """SIGKILL the driver with some shards done and others in flight; the re-run scores only the rest and gives the
    reference ranking; a third run recomputes nothing."""
    cfg_path = write_config(tmp_path, micro_trajectory, [pool])
    root = job_dir(cfg_path)
    seed_shared(root, reference.root)
    with driver_process(cfg_path, head.address, tmp_path / "run1.log") as proc:
        wait_until(some_shards_done(root, driver_log=tmp_path / "run1.log"), JOB_TIMEOUT, "some shards done")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("pool-*.parquet")
            if not p.name.endswith(".rejects.parquet")}
    assert 0 < len(done) < N_SHARDS and not (root / "summary.json").exists()

    rc, out = run_driver(cfg_path, head.address, tmp_path / "run2.log")
    assert rc == 0, out[-4000:]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["run"]["shards_skipped"] == len(done)
    assert summary["run"]["samples_scored_this_run"] == (N_SHARDS - len(done)) * PER_SHARD
    for name, mtime in done.items():  # finished shards were not rescored
        assert (root / "shards" / name).stat().st_mtime_ns == mtime
    assert_complete(root, pool_uids)
    assert_same_ranking(root, reference.root)

    before = mtimes(root)
    t0 = time.time()
    rc, out = run_driver(cfg_path, head.address, tmp_path / "run3.log")
    assert rc == 0, out[-4000:]
    assert "job already complete, nothing recomputed" in out
    assert "Connecting to existing Ray cluster" not in out and "shards:" not in out  # no Ray, no scoring
    assert mtimes(root) == before
    print(f"third run (nothing to do): {time.time() - t0:.1f}s")


@pytest.mark.slow
def test_node_lost_mid_run(pool, pool_uids, reference, micro_trajectory, tmp_path):
    """A head and a second node with one CPU each, so one actor lands on each; kill the second node while its actor
    scores: the job completes on the head alone with the reference ranking."""
    fast_health = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    head2 = RayNode(num_cpus=1, env=fast_health)
    nodes = [head2]
    try:
        worker = RayNode(num_cpus=1, head_address=head2.address)  # joins on 127.0.0.1 (see _JOIN_ON_LOOPBACK)
        nodes.append(worker)
        cfg_path = write_config(tmp_path, micro_trajectory, [pool])
        root = job_dir(cfg_path)
        seed_shared(root, reference.root)
        with driver_process(cfg_path, head2.address, tmp_path / "driver.log") as proc:
            wait_until(some_shards_done(root, busy_on=worker, driver_log=tmp_path / "driver.log"), JOB_TIMEOUT,
                       "shards done on both nodes and the second node's actor mid-shard")
            worker.kill()
            rc = proc.wait(timeout=JOB_TIMEOUT)
        out = (tmp_path / "driver.log").read_text(errors="replace")
        assert rc == 0, out[-4000:]
        summary = json.loads((root / "summary.json").read_text())
        assert list(summary["run"]["failed_attempts"].values()) == [1], summary["run"]
        assert_complete(root, pool_uids)
        assert_same_ranking(root, reference.root)
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["one_actor", "shards_listed_in_reverse"])
def test_ranking_independent_of_actors_and_shard_order(variant, connected, reference, pool, pool_uids,
                                                       micro_trajectory, tmp_path):
    """The same ranking, bit for bit, with one actor instead of two (for the shared quantities, split between two
    actors in the reference run, and for scoring), and with the pool given as single shards in reverse order
    instead of a directory (a new job directory each: shared quantities recomputed too)."""
    from pruner.jobs.prune import run
    if variant == "one_actor":
        cfg_path = write_config(tmp_path, micro_trajectory, [pool], ray={"num_actors": 1})
        assert job_dir(cfg_path).name == reference.root.name  # ray settings are not part of the job id
    else:
        cfg_path = write_config(tmp_path, micro_trajectory, sorted(pool_uids, reverse=True))
    status, summary = run(load_config(cfg_path))
    assert status == 0 and summary["run"]["actors"] == (1 if variant == "one_actor" else 2)
    root = job_dir(cfg_path)
    assert_complete(root, pool_uids)
    assert_same_ranking(root, reference.root)


@pytest.mark.parametrize("case", ["not_a_tar", "vanished"])
def test_failing_shard_is_retried_then_reported(head, pool, micro_trajectory, tmp_path, case):
    """A shard that cannot be read fails the job: listed in failed.json (a clean one-line message, the traceback apart,
    neither with colour codes or Ray's ^^^ markers) and the exit status is 1; nothing is selected from the partial
    pool. A file that is not a tar archive (empty or garbage) is reported at once, since no retry can help; one
    that cannot be opened (here a link to a file that is gone: missing on this node, a permission or network error)
    is retried ray.max_retries times first."""
    good = [shutil.copy(pool / f"pool-{i:06d}.tar", tmp_path / f"pool-{i:06d}.tar") for i in range(2)]
    bad = tmp_path / "pool-000099.tar"
    if case == "not_a_tar":
        bad.write_bytes(b"<html>503 Service Unavailable</html>\n" * 20)
    else:
        bad.symlink_to(tmp_path / "gone.tar")
    attempts, error = {"not_a_tar": (1, "ShardNotATarError"), "vanished": (3, "ShardUnreadableError")}[case]
    cfg_path = write_config(tmp_path, micro_trajectory, [tmp_path / "pool-*.tar"],
                            ray={"max_retries": 2, "num_actors": 1})
    root = job_dir(cfg_path)
    names = ("pruner_shard_attempts_failed", "pruner_shards_failed")
    before = {m: scrape(head.metrics_port, m) for m in names}
    rc, out = run_driver(cfg_path, head.address, tmp_path / "driver.log")
    assert rc == 1, out[-4000:]
    failed = json.loads((root / "failed.json").read_text())
    assert list(failed["shards_failed"]) == [str(bad)]
    message = failed["shards_failed"][str(bad)]
    assert message.startswith(f"{error}: cannot read {bad} as a tar archive") and "\n" not in message, message
    trace = failed["failure_tracebacks"][str(bad)]
    assert error in trace and 'File "' in trace  # the frames of the task's traceback
    for text in (message, trace):
        assert "\x1b" not in text and "^^^" not in text, text
    assert failed["failed_attempts"] == {str(bad): attempts}
    assert out.count("retrying") == attempts - 1 and f"failed {attempts} time(s), giving up" in out
    assert f"1 shard(s) failed: ['{bad}']" in out
    for g in good:
        assert JobLayout(root).scores(str(g)).exists()
    assert not (root / "summary.json").exists() and not (root / "ranking.parquet").exists()

    def counted():
        now = {m: scrape(head.metrics_port, m) for m in names}
        got = {m: new_series(before[m], now[m]) for m in names}
        return got if got == {"pruner_shard_attempts_failed": attempts, "pruner_shards_failed": 1} else None
    wait_until(counted, 60, "the failed shard in the metrics export", step=1)


def test_gpu_actors_on_a_cpu_cluster_fail_clearly(head, pool, micro_trajectory, tmp_path):
    """ray.accelerator: gpu asks for GPU actors even when no GPU node is up (an autoscaler would add one); on this
    CPU-only cluster nothing can place them, so after ray.placement_timeout_s the job exits 1 naming the
    missing resource instead of waiting forever."""
    cfg_path = write_config(tmp_path, micro_trajectory, [pool / "pool-000000.tar"],
                            ray={"accelerator": "gpu", "num_actors": 1, "placement_timeout_s": 3})
    rc, out = run_driver(cfg_path, head.address, tmp_path / "driver.log", timeout=120)
    assert rc == 1, out[-4000:]
    assert "requesting 1 GPU actors, 0 GPU(s) in the cluster now" in out
    assert "the shared-quantity actors could not be placed within ray.placement_timeout_s=3s" in out
    assert "1 CPU + 1 GPU" in out and "Fix:" in out
    assert not JobLayout(job_dir(cfg_path)).scores(str(pool / "pool-000000.tar")).exists()


def test_config_change_new_directory_same_config_nothing_recomputed(reference, micro_trajectory):
    from pruner.jobs.prune import run
    root = reference.root
    assert job_dir(reference.cfg_path) == root
    before = mtimes(root)
    status, summary = run(load_config(reference.cfg_path))
    assert status == 0 and summary["counts"]["samples"] == N_SHARDS * PER_SHARD
    assert mtimes(root) == before  # nothing written, let alone recomputed

    # not part of the scores: ray settings, and select (re-derived from the stored scores: see the next test)
    for override in ("ray.num_actors=1", "ray.max_retries=5", "ray.cpus_per_actor=2", "select.keep_fraction=0.3",
                     "select.score=tracin_target", "select.policy=class_balanced"):
        assert prepare(load_config(reference.cfg_path, [override]))[0].root == root
    changed = {}
    for override in ("features.k=64", "seed=1", "scores.diffin.fd_eps=0.02", "target.max_samples=32"):
        new_root = prepare(load_config(reference.cfg_path, [override]))[0].root
        assert new_root != root and new_root.parent == root.parent
        assert not list(new_root.glob("shards/*.parquet"))  # a fresh job: nothing reused
        changed[override] = new_root.name
    assert len(set(changed.values())) == len(changed)


def test_select_change_reselects_without_scoring(connected, reference, micro_trajectory, pool, tmp_path, capsys):
    """A re-run with only select.* changed reuses the job directory, scores nothing and re-selects from the stored
    score tables; config.yaml and summary.json hold the settings applied. Back to the first settings, the ranking and
    keep set are the reference's again (a policy's keep/policy.json is not left behind)."""
    from pruner.jobs.prune import run
    cfg_path = write_config(tmp_path, micro_trajectory, [pool])  # the reference's config, in another output_dir
    root = job_dir(cfg_path)
    assert root.name == reference.root.name
    shutil.copytree(reference.root, root, dirs_exist_ok=True)
    scored = {k: v for k, v in mtimes(root).items() if k.startswith(("shards/", "shared/"))}

    status, summary = run(load_config(cfg_path, ["select.keep_fraction=0.3"]))
    assert status == 0 and "every shard is already scored" in capsys.readouterr().out
    assert summary["select"]["keep_fraction"] == 0.3 and summary["counts"]["kept"] == 96  # floor(0.3 x 320)
    assert yaml.safe_load((root / "config.yaml").read_text())["select"]["keep_fraction"] == 0.3
    ranking = pq.read_table(root / "ranking.parquet")
    assert sum(ranking["kept"].to_pylist()) == 96 and len(load_uid_npy(root / "keep" / "uids.npy")) == 96
    ref = pq.read_table(reference.root / "ranking.parquet")
    assert ranking.drop(["kept"]).equals(ref.drop(["kept"]))  # the same scores and order, another cut
    before = mtimes(root)
    status, _ = run(load_config(cfg_path, ["select.keep_fraction=0.3"]))
    assert status == 0 and "job already complete, nothing recomputed" in capsys.readouterr().out
    assert mtimes(root) == before

    status, summary = run(load_config(cfg_path, ["select.policy=class_balanced"]))
    assert status == 0 and summary["policy"]["policy"] == "class_balanced" and summary["counts"]["kept"] == 160
    assert (root / "keep" / "policy.json").exists()
    status, summary = run(load_config(cfg_path))
    assert status == 0 and not (root / "keep" / "policy.json").exists()
    assert_same_ranking(root, reference.root)
    for name in ("manifest.json", "uids.npy"):
        assert (root / "keep" / name).read_bytes() == (reference.root / "keep" / name).read_bytes()
    assert yaml.safe_load((root / "config.yaml").read_text())["select"] == summary["select"] == \
        load_config(reference.cfg_path).select.model_dump(mode="json")
    assert {k: v for k, v in mtimes(root).items() if k in scored} == scored  # nothing was scored again


def test_shard_sorting_first_is_refused(reference, pool, capsys):
    """A shard that lands in the lake sorting before the scored ones changes the hash-picked bank, reference and OGA
    samples (the pool's first samples in sorted order): though every shared quantity is on disk, the re-run
    refuses, naming the shard and the fix (no traceback, exit status 1), and changes nothing."""
    from pruner.cli.prune import main
    before = mtimes(reference.root)
    extra = pool / "aaa-000000.tar"
    shutil.copy(pool / "pool-000000.tar", extra)  # the same pairs under other uids (the shard file names them)
    try:
        assert main(["--config", str(reference.cfg_path)]) == 1
    finally:
        extra.unlink()
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(extra) in err and "fix: run a full job" in err
    assert "bank, curvature, oga, reference samples picked now differ" in err and "shared/inputs.json" in err
    assert mtimes(reference.root) == before


def test_repaired_shard_is_scored_again(connected, pool_uids, micro_trajectory, tmp_path):
    """A shard cut off when first scored (its later samples lost: one truncated_tar reject, whose fix says to
    re-download it) and restored afterwards is scored again by the next run, which then equals a fresh run over the
    lake. The bank (4 x 16), reference (4 x 32), curvature (4 x 32) and OGA (100) samples all come from the first
    four shards here, so repairing the last one leaves them unchanged."""
    from pruner.jobs.prune import run
    lake = tmp_path / "lake"
    lake.mkdir()
    for url in pool_uids:
        shutil.copy(url, lake)
    # json uids stay; fallback uids (<folder>/<file>/<key>) name the lake's folder
    lake_uids = {str(lake / Path(url).name): [f"lake/{u.split('/', 1)[1]}" if "/" in u else u for u in uids]
                 for url, uids in pool_uids.items()}
    feats = {"k": 128, "layer_k": 8, "bank_size": 16, "batch_size": 50}
    cfg_path = write_config(tmp_path, micro_trajectory, [lake], features=feats)
    root = job_dir(cfg_path)
    victim = lake / f"pool-{N_SHARDS - 1:06d}.tar"
    whole = victim.read_bytes()
    victim.write_bytes(whole[:len(whole) // 2])
    status, summary = run(load_config(cfg_path))
    assert status == 0 and summary["rejects_by_reason"] == {"truncated_tar": 1}
    assert 0 < summary["counts"]["samples"] < N_SHARDS * PER_SHARD

    victim.write_bytes(whole)
    status, summary = run(load_config(cfg_path))
    assert status == 0
    assert summary["run"]["shards_changed"] == 1 and summary["run"]["shards_skipped"] == N_SHARDS - 1
    assert summary["run"]["samples_scored_this_run"] == PER_SHARD
    assert_complete(root, lake_uids)  # every restored sample scored once, no reject left
    before = mtimes(root)
    status, _ = run(load_config(cfg_path))
    assert status == 0 and mtimes(root) == before  # now unchanged: nothing scored again

    (tmp_path / "fresh").mkdir()
    fresh_path = write_config(tmp_path / "fresh", micro_trajectory, [lake], features=feats)
    fresh = job_dir(fresh_path)
    seed_shared(fresh, root)  # the same shared quantities (checked against shared/inputs.json by the run)
    status, _ = run(load_config(fresh_path))
    assert status == 0
    assert_same_ranking(root, fresh)


def test_second_driver_on_a_job_is_refused(head, reference, pool, pool_uids, micro_trajectory, tmp_path, capsys):
    """Two drivers on one job directory (a scheduled run starting while the previous run's Ray job still runs): the
    second is refused at once, naming the lock file and the fix (exit status 1, no traceback); the first completes
    with the reference ranking, and once it has exited the lock is free again."""
    from pruner.cli.prune import main
    cfg_path = write_config(tmp_path, micro_trajectory, [pool])
    root = job_dir(cfg_path)
    seed_shared(root, reference.root)
    log = tmp_path / "first.log"
    with driver_process(cfg_path, head.address, log) as first:
        wait_until(some_shards_done(root, driver_log=log), JOB_TIMEOUT, "the first driver scoring")
        assert main(["--config", str(cfg_path)]) == 1
        err = capsys.readouterr().err
        assert first.poll() is None  # the lock was held by a running driver, not left behind
        rc = first.wait(timeout=JOB_TIMEOUT)
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    assert f"holds the lock {root / 'job.lock'}" in err and "Fix: wait for it to finish" in err
    # refused before any model, Ray or directory work: a fresh driver process, while the lock is held, has not even
    # imported torch or ray when it exits
    code = (f"import sys; from pruner.cli.prune import main; rc = main(['--config', {str(cfg_path)!r}]); "
            f"assert rc == 1, rc; assert not {{'torch', 'ray'}} & set(sys.modules), 'imported torch or ray'")
    with JobLayout(root).locked():
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"holds the lock {root / 'job.lock'}" in second.stderr
    assert "Traceback" not in err
    assert_complete(root, pool_uids)
    assert_same_ranking(root, reference.root)
    assert main(["--config", str(cfg_path)]) == 0
    assert "job already complete, nothing recomputed" in capsys.readouterr().out
