"""Never hang in silence: what the driver waits for, and a deadline on waiting.

`PoolWatch` reads the cluster's view of this job's scoring actors (alive, pending, restarting)
and of the resources they need, for the progress lines ("pool short of its minimum: 1 of 2
actors alive, 1 pending: needs {'scorer': 1}, free 0 of 1") and for the message of a run that
stops making progress. `Stalled` is raised by the driver when nothing was committed for
`stall_timeout_s` seconds.

Everything here is best effort and read-only: a diagnosis that cannot be had (an older Ray, a
GCS hiccup) says so instead of failing the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Actor states of Ray's GCS actor table that mean "not serving yet / any more".
WAITING_STATES = {
    "DEPENDENCIES_UNREADY": "waiting for their arguments",
    "PENDING_CREATION": "being created (loading the model, or waiting for resources)",
    "RESTARTING": "restarting (their node was lost or they died)",
}


# Why a dead actor died, in the GCS table's DeathCause text: Ray Data drops (or kills) its pool's
# actors once the scoring operator has no more input, so these mean "done", not "lost".
RELEASED_REASONS = ("reason: REF_DELETED", "reason: RAY_KILL")


class Stalled(RuntimeError):
    """The run made no progress for stall_timeout_s."""


@dataclass
class PoolWatch:
    minimum: int  # the pool's minimum (resources.actors, or its first value)
    needs: dict[str, float]  # what one scoring actor asks for (CPU, GPU, custom resources)

    def actor_states(self) -> Counter:
        """State -> count of this job's Ray Data actors (the scoring pool's; the job has no others).
        Dead ones count as RELEASED when the pool let them go, and are left out otherwise."""
        import ray
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        states: Counter = Counter()
        for info in state.actors().values():
            if info.get("JobID") == job and "MapWorker" in info.get("ActorClassName", ""):
                if info.get("State") != "DEAD":
                    states[info["State"]] += 1
                elif any(r in str(info.get("DeathCause", "")) for r in RELEASED_REASONS):
                    states["RELEASED"] += 1
        return states

    def resources(self) -> dict[str, tuple[float, float]]:
        """name -> (free, total) for each resource a scoring actor needs."""
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        return {k: (free.get(k, 0.0), total.get(k, 0.0)) for k in self.needs}

    def status(self) -> str | None:
        """A line when the pool is short of its minimum, else None."""
        try:
            states = self.actor_states()
        except Exception as e:  # noqa: BLE001 - diagnosis only
            return f"scoring pool state unknown ({type(e).__name__})"
        alive = states.get("ALIVE", 0)
        if alive >= self.minimum or pool_finished(states):
            return None
        return f"scoring pool short of its minimum: {alive} of {self.minimum} actor(s) alive{self._waiting(states)}"

    def _waiting(self, states: Counter) -> str:
        waiting = {s: states[s] for s in WAITING_STATES if states.get(s)}
        if not waiting:
            return ""
        try:
            res = self.resources()
        except Exception:  # noqa: BLE001
            res = {}
        have = ", ".join(f"{k} {f:g} free of {t:g}" for k, (f, t) in res.items())
        what = ", ".join(f"{n} {WAITING_STATES[s]}" for s, n in waiting.items())
        return f", {what}: each needs {self.needs}" + (f" (cluster: {have})" if have else "")

    def diagnose(self, idle_s: float) -> str:
        """Why a run made no progress, as far as the cluster can tell."""
        try:
            states = self.actor_states()
        except Exception as e:  # noqa: BLE001
            return f"no unit committed for {idle_s:.0f}s (the cluster's actor table could not be read: {e})"
        alive = states.get("ALIVE", 0)
        msg = f"no unit committed for {idle_s:.0f}s (stall_timeout_s): scoring actors {dict(states) or 'none'}"
        if pool_finished(states):
            msg += "; the scoring pool has finished, so a write or commit downstream is stuck or very slow"
        elif alive < self.minimum:
            msg += (
                f"; the pool waits for its minimum of {self.minimum} (resources.actors){self._waiting(states)}. "
                f"Free the resources (another job may hold them), add nodes, or give resources.actors as "
                f"[min, max] with a smaller min so the pool keeps going on what is left"
            )
        else:
            msg += (
                "; the actors are alive, so a task is stuck or very slow (a scoring call, a read or a write: "
                "see the Ray dashboard or `ray list tasks --filter state=RUNNING`); raise stall_timeout_s if "
                "single calls legitimately take this long"
            )
        return msg


def pool_finished(states: Counter) -> bool:
    """The pool has done its share: every actor it had was released, none is starting or restarting
    (the writes downstream may still be committing). A pool that lost actors has some waiting."""
    return states.get("RELEASED", 0) > 0 and not any(states.get(s) for s in ("ALIVE", *WAITING_STATES))
