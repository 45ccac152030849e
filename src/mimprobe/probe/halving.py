"""Successive halving over a head's (lr, wd) grid (``--grid-search halving``), as in Hyperband / ASHA.

Every member trains from the start; at each rung (a fraction of the full schedule) every member still training
is scored on the validation rows and only the best ``keep`` fraction (at least one) goes on; the others stop
there, and their scores at the stop are what the record keeps. The ranking is the selection rule's: validation
top-1, ties broken by the lower validation cross-entropy (then the earlier grid point). A surviving member's
training is the full grid's (same steps, learning-rate schedule, batches): members never interact, and the
stopped ones are cut out of the stacked parameters (:meth:`GridHead.keep_members`), so the compute shrinks with
the grid. Sources: Jamieson & Talwalkar 2016 (successive halving), Li et al. 2018 (Hyperband), Li et al. 2020
(ASHA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mimprobe.errors import UserError
from mimprobe.probe.options import DEFAULT_KEEP, DEFAULT_RUNGS



def ranking(top1: torch.Tensor, loss: torch.Tensor) -> list[int]:
    """Member positions best first: higher validation top-1, then lower validation loss, then the earlier one."""
    return sorted(range(len(top1)), key=lambda i: (-float(top1[i]), float(loss[i]), i))


def survivors(top1: torch.Tensor, loss: torch.Tensor, keep: float) -> list[int]:
    """Positions (in grid order) of the members a rung keeps: the best ``ceil(keep × n)``, at least one."""
    n = max(1, math.ceil(keep * len(top1) - 1e-9))
    return sorted(ranking(top1, loss)[:n])


@dataclass(frozen=True)
class Halving:
    """The rungs (fractions of the schedule's steps) and the fraction of the members each one keeps."""

    rungs: tuple[float, ...] = DEFAULT_RUNGS
    keep: float = DEFAULT_KEEP

    def steps(self, total: int) -> list[int]:
        """The optimizer steps after which each rung scores and cuts the grid, one per rung: a schedule too short
        to give every rung its own step inside the run is an error (rung numbers in the records must be the
        rungs asked for)."""
        steps = [int(round(r * total)) for r in self.rungs]
        if len(set(steps)) < len(steps) or not all(0 < s < total for s in steps):
            rungs = ",".join(f"{r:g}" for r in self.rungs)
            raise UserError(f"--halving-rungs {rungs}: a {total}-step schedule puts them at steps "
                            f"{', '.join(map(str, steps))}; each rung needs its own step after 0 and before "
                            f"{total}: choose rungs further apart or train longer (--min-steps)")
        return steps

    def describe(self) -> dict:
        return {"kind": "halving", "rungs": list(self.rungs), "keep": self.keep,
                "rule": "at each rung keep the best ceil(keep x alive) members on validation top-1 (ties: lower "
                        "validation loss); the others stop there"}


@dataclass
class SearchState:
    """Where a grid's search stands: each head's members still training (grid indices, in order), the members
    stopped at a rung with their validation scores then, and the member-steps trained so far."""

    alive: dict[str, list[int]]
    stopped: dict[str, dict[int, dict]] = field(default_factory=dict)
    member_steps: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, heads, members: int) -> "SearchState":
        return cls({k: list(range(members)) for k in heads}, {k: {} for k in heads}, {k: 0 for k in heads})

    def count_step(self) -> None:
        for k, a in self.alive.items():
            self.member_steps[k] += len(a)

    def cut(self, key: str, val: dict, keep: float, rung: int, step: int) -> list[int]:
        """Apply a rung to head ``key`` scored ``val`` (top1 and loss of its alive members, in order): record the
        stopped members, return the positions (among the alive) that go on."""
        alive = self.alive[key]
        kept = survivors(val["top1"], val["loss"], keep)
        for pos, g in enumerate(alive):
            if pos not in kept:
                self.stopped[key][g] = {"rung": rung, "step": step, "val_top1": float(val["top1"][pos]),
                                        "val_loss": float(val["loss"][pos])}
        self.alive[key] = [alive[p] for p in kept]
        return kept

    def state_dict(self) -> dict:
        return {"alive": self.alive, "member_steps": self.member_steps,
                "stopped": {k: [[g, s["rung"], s["step"], s["val_top1"], s["val_loss"]] for g, s in st.items()]
                            for k, st in self.stopped.items()}}

    @classmethod
    def from_state(cls, sd: dict) -> "SearchState":
        stopped = {k: {int(g): {"rung": int(r), "step": int(s), "val_top1": float(t), "val_loss": float(lo)}
                       for g, r, s, t, lo in st} for k, st in sd["stopped"].items()}
        return cls({k: [int(g) for g in a] for k, a in sd["alive"].items()}, stopped,
                   {k: int(v) for k, v in sd["member_steps"].items()})


@dataclass
class Trace:
    """Measurement only (``benchmarks/grid_search.py``), never a selection: every member's scores on each of
    ``feeds`` (name → feeder; e.g. the validation rows and the eval store) after each step in ``steps(total)``
    (``fractions`` of the schedule; 1.0 is the end), filled in by the trainer as ``scores[step][feed][head]`` =
    {"top1": [...], "loss": [...]} with one value per grid member (None for a member no longer training).
    Members never interact and scoring does not touch the training state, so a traced run trains as an untraced
    one: with the full grid, the scores at a rung are those a halving run would rank there. One trace per seed
    (a run of several seeds overwrites it); the scoring time counts in the run's ``train_seconds``."""

    fractions: tuple[float, ...]
    feeds: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    total: int = 0

    def steps(self, total: int) -> set[int]:
        self.total = total
        return {s for s in (int(round(f * total)) for f in self.fractions) if 0 < s <= total}

    def record(self, step: int, scores: dict, alive: dict[str, list[int]], members: int) -> None:
        """``scores``: feed name → what :func:`~mimprobe.probe.trainer.evaluate` returned (per head, over the
        alive members in order)."""
        out = self.scores.setdefault(step, {})
        for name, per_head in scores.items():
            for key, sc in per_head.items():
                row = {m: [None] * members for m in ("top1", "loss")}
                for pos, g in enumerate(alive[key]):
                    for m in row:
                        row[m][g] = float(sc[m][pos])
                out.setdefault(name, {})[key] = row
