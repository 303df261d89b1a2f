"""A generic retrying task pool over Ray actors: one task per item, retries, dead actors, placement. Knows nothing
of shards or scores (the driver supplies how to submit an item and what to do with its result).

Failures: an attempt fails when its task raises or its actor dies mid-task (crash, OOM kill, node loss). The item
is requeued up to ``max_retries`` times, then given up; errors of the ``final`` types (deterministic: the same on
every retry and node) are given up at once. A dead actor is restarted by Ray (its ``max_restarts``) and gets new
work only once it answers a ping, so items never queue behind an actor that cannot come back (e.g. its node is
gone and no other node has room); an actor that is dead for good is dropped, and if none is left the remaining
items are given up instead of waiting forever.

Timing: items are handed out once every actor is ready (or ``start_grace_s`` after the first one was), so
``run_seconds`` is the working phase alone and ``actor_start_seconds`` the start-up before it.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Sequence

import ray
from tqdm import tqdm

log = logging.getLogger("pruner.driver")
ACTOR_START_GRACE_S = 60.0  # after the first actor is ready, wait at most this long for the others


class PlacementError(RuntimeError):
    """No node offered the resources an actor asks for within ray.placement_timeout_s."""


def placement_guard(timeout_s: float, need: str):
    """``wait(ping refs, what)``: block until the first of the pings answers, or raise a PlacementError naming the
    resources (``need``, e.g. "1 CPU + 1 GPU") no node offered after ``timeout_s`` (a pending actor would otherwise
    wait forever)."""
    def wait(refs: list, what: str) -> None:
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"{what} could not be placed within ray.placement_timeout_s={timeout_s:g}s: no node offers {need} "
                f"(cluster: {ray.cluster_resources()}). Fix: add such nodes (or let the autoscaler do so), lower "
                f"ray.cpus_per_actor, or set ray.accelerator (auto/cpu) to match the cluster")
    return wait


class RetryingActorPool:
    """Runs ``submit(actor, item)`` (an ObjectRef) for every item on ``actors`` (Ray actor handles with a ``ping``
    method), with the retries of the module docstring. ``on_result(item, value)`` handles a result and returns how
    many units (``unit``: samples) it completed; a ValueError from it is a failed attempt. ``on_failure(item,
    error, attempt, given_up)`` is told of every failed attempt (``error``: the exception; ``attempt``: its number,
    None when the item was given up unattempted because no actor is left). ``desc`` names the items and ``what``
    the actors in the progress bar and the placement error."""

    def __init__(self, actors: Sequence, *, max_retries: int, wait_placed: Callable, final: tuple = (),
                 start_grace_s: float = ACTOR_START_GRACE_S, desc: str = "shards", unit: str = "samples",
                 what: str = "scoring actors"):
        self.actors, self.max_retries, self.wait_placed = list(actors), max_retries, wait_placed
        self.final, self.start_grace_s = final, start_grace_s
        self.desc, self.unit, self.what = desc, unit, what

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)

    def run(self, items: Sequence, submit: Callable, on_result: Callable, on_failure: Callable) -> dict:
        """Process every item; returns {"actor_start_seconds", "actors_ready_at_start", "run_seconds",
        "units_done"}. The actors are killed when it ends, however it ends."""
        t_start = time.time()
        # inflight: object ref -> (item, actor) for a task, (None, actor) for a readiness probe (ping) of a new actor
        # or of one whose task died with it: an actor takes items only once its probe has answered
        queue, idle = deque(items), []
        inflight = {a.ping.remote(): (None, a) for a in self.actors}
        attempts: dict = {}
        done, t1, first_ready, timing = 0, None, None, {}
        bar = tqdm(total=len(items), desc=self.desc, unit=self.desc.rstrip("s"), dynamic_ncols=True)

        def failed(item, error: Exception, retry: bool) -> None:
            n = attempts[item] = attempts.get(item, 0) + 1
            give_up = not (retry and n <= self.max_retries)
            if give_up:
                bar.update(1)
            else:
                queue.append(item)
            on_failure(item, error, n, give_up)

        try:
            self.wait_placed(list(inflight), f"none of the {len(self.actors)} {self.what}")
            while queue or any(item is not None for item, _ in inflight.values()):
                waited = time.time() - first_ready if first_ready is not None else 0.0
                if t1 is None and (not inflight or waited > self.start_grace_s):
                    t1 = time.time()
                    timing = {"actor_start_seconds": t1 - t_start, "actors_ready_at_start": len(idle)}
                    log.info("%d of %d actors ready after %.1fs", len(idle), len(self.actors), t1 - t_start)
                while t1 is not None and queue and idle:
                    actor, item = idle.pop(), queue.popleft()
                    inflight[submit(actor, item)] = (item, actor)
                if not inflight:  # every actor is dead for good: give up the rest instead of waiting forever
                    while queue:
                        on_failure(queue.popleft(), RuntimeError(f"no {self.what.rstrip('s')} left (every actor died "
                                                                 f"more often than max_restarts)"), None, True)
                        bar.update(1)
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=None if t1 is not None else 1.0)
                for ref in ready:
                    item, actor = inflight.pop(ref)
                    if item is None:  # a readiness probe
                        try:
                            ray.get(ref)
                            idle.append(actor)
                            first_ready = first_ready or time.time()
                        except ray.exceptions.ActorUnavailableError:  # still restarting or unreachable: ask again
                            time.sleep(0.5)
                            inflight[actor.ping.remote()] = (None, actor)
                        except ray.exceptions.RayError as e:  # dead for good (restarts exhausted, constructor failed)
                            log.error("an actor is dead for good, continuing without it: %s", str(e)[:300])
                        continue
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        # the task raised, or its actor died with it (Ray restarts the actor), or the result was lost
                        # with its node: either way the actor takes new work only once it answers a ping
                        inflight[actor.ping.remote()] = (None, actor)
                        failed(item, e, retry=not isinstance(getattr(e, "cause", None), self.final)
                               and not isinstance(e, self.final))
                        continue
                    idle.append(actor)
                    try:
                        done += on_result(item, value)
                    except ValueError as e:  # a result that cannot be kept (e.g. features that overflow float16):
                        failed(item, e, retry=True)  # a failed attempt like any other, retried
                        continue
                    bar.update(1)
                    bar.set_postfix({self.unit: done, "rate": f"{done / max(time.time() - t1, 1e-9):.1f}/s"})
            timing.update(run_seconds=time.time() - (t1 or time.time()), units_done=done)  # before the actors go
        finally:
            bar.close()
            self.kill()
        return timing
