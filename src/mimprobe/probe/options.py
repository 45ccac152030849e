"""What ``mimprobe probe`` (and :func:`mimprobe.probe`, and a suite's evaluations) can be asked: every option of a
probe run, declared once (:mod:`mimprobe.options`), its defaults, and :func:`validate` (the checks of the options
alone, before any store is opened). Imports nothing heavy: the command line is built from it."""

from __future__ import annotations

from dataclasses import dataclass

from mimprobe.checks import a_bool, a_float, a_list, a_size, a_str, an_int, one_of
from mimprobe.errors import UserError
from mimprobe.options import check_fields, fmt, option

DEFAULT_HEADS = ["linear-cls", "linear-mean", "abmilp"]
OPTIMIZERS = ("auto", "adamw", "lars", "lbfgs")
# docs/protocol.md: the first grids (lr 1e-4..1e-2 x wd 5e-4, 5e-2) were left at an edge in most measured runs
# (lr = max with all rows, lr = min on 10 shots): half-decades over three decades and a middle wd bracket them
DEFAULT_LRS = {"adamw": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "lars": [0.1]}
DEFAULT_WDS = {"adamw": [5e-4, 5e-3, 5e-2], "lars": [0.0]}
# docs/protocol.md: with an upper edge at 1, few-shot runs chose that edge in most seeds; three more decades
# (benchmarks/l2_grid.py) gain up to 2.4 pt at 1 shot and move nothing with every row
DEFAULT_L2 = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
# the single (lr, wd) / l2 used with --val-fraction 0 and no --lr / --wd / --l2 (docs/protocol.md)
DEFAULT_POINT = {"adamw": (1e-3, 5e-2), "lars": (0.1, 0.0), "lbfgs": 1e-3}
MIN_STEPS = 2500  # docs/protocol.md: the floor measured so that small sets do not underfit (1000 did on CIFAR-10)
VAL_CAP = 10_000  # validation rows drawn outside a subset, at most
VAL_FROM = ("outside", "subset")
DEVICES = ("auto", "cpu", "cuda")
# DINO's weighted kNN (probe/knn.py): its k values and temperature; the memory budget of one search
DINO_KS = (10, 20, 100, 200)
DINO_T = 0.07
# the votes a kNN sweep may score; DINO's (and the default) is the weighted one alone (docs/protocol.md)
VOTES = ("weighted", "majority")
DEFAULT_VOTES = ("weighted",)
DEFAULT_MEMORY = 2 << 30  # bytes
# successive halving (probe/halving.py; docs/protocol.md, "Successive halving")
SEARCHES = ("full", "halving")
DEFAULT_RUNGS = (0.1, 0.25, 0.5)
DEFAULT_KEEP = 1 / 3

a_device = one_of(*DEVICES, prefix="cuda:")
positive = a_float(0, lo_open=True)
a_fraction = a_float(0, 1, lo_open=True, hi_open=True)


@dataclass
class ProbeOptions:
    heads: list[str] = option([], "head spec(s), repeat or comma list, options as kind:key=value,..., HEAD@B for block B alone",
                              kind="specs", flags=("--head",), show=",".join(DEFAULT_HEADS))
    lrs: list[float] = option([], "learning rates, comma list", kind="list", item=float, flags=("--lr",),
                              check=a_list(positive, allow_empty=True), suite="evaluations.lr",
                              show=f"{fmt(DEFAULT_LRS['adamw'])}; lars: base lr {fmt(DEFAULT_LRS['lars'])}")
    wds: list[float] = option([], "weight decays, comma list", kind="list", item=float, flags=("--wd",),
                              check=a_list(a_float(0), allow_empty=True), suite="evaluations.wd",
                              show=f"{fmt(DEFAULT_WDS['adamw'])}; lars: {fmt(DEFAULT_WDS['lars'])}")
    l2: list[float] = option([], "L2 penalties of the L-BFGS linear heads, comma list (l2 = 1/(C N) for "
                             "scikit-learn's C)", kind="list", item=float, check=a_list(positive, allow_empty=True),
                             suite="evaluations.l2", show=fmt(DEFAULT_L2))
    epochs: int = option(10, "training epochs (at least --min-steps steps)", check=an_int(1), suite="evaluations.epochs")
    min_steps: int = option(MIN_STEPS, "train at least this many optimizer steps, whatever the data size "
                            "(docs/protocol.md)", check=an_int(0), suite="evaluations.min_steps")
    batch_size: int = option(256, "training batch size", check=an_int(1), suite="evaluations.batch_size")
    optimizer: str = option("auto", "auto (linear heads: full-batch L-BFGS logistic regression when their pooled "
                            "features fit in memory; others: adamw) | adamw | lars (the paper: lr = base x batch/256, "
                            "10 warmup epochs) | lbfgs (linear heads only)", check=one_of(*OPTIMIZERS),
                            suite="evaluations.optimizer")
    warmup_epochs: float | None = option(None, "warmup epochs (default 1 with adamw, 10 with lars; at most epochs/4)",
                                         check=a_float(0), suite="evaluations.warmup_epochs")
    seeds: list[int] = option([0], "seeds, comma list: one result each", kind="list", item=int,
                              flags=("--seeds", "--seed"), check=a_list(an_int(0), unique=True))
    val_fraction: float = option(0.1, "validation rows for choosing: this fraction of the train store",
                                 check=a_float(0, 1, hi_open=True), suite="evaluations.val_fraction")
    val_from: str = option("outside", "with --shots/--fraction/--subset: draw validation rows outside the subset "
                           "(outside) or cut them from it (subset)", check=one_of(*VAL_FROM), suite="evaluations.val_from")
    val_max: int = option(VAL_CAP, "at most this many validation rows drawn outside a subset", check=an_int(1),
                          suite="evaluations.val_max")
    shots: int | None = option(None, "K samples per class from the train store", check=an_int(1))
    fraction: float | None = option(None, "a stratified fraction of the train store", check=a_float(0, 1, lo_open=True))
    subset: str | None = option(None, "file of sample ids (one per line), e.g. ImageNet 1%", check=a_str)
    final_norm: bool = option(False, "apply the model's final norm to tokens (default: raw)", check=a_bool,
                              suite="evaluations.final_norm")
    layers: list[int] = option([], "also build each head over these blocks, e.g. -1,-4", kind="list", item=int,
                               check=a_list(an_int(), allow_empty=True), suite="evaluations.layers")
    in_memory: bool | None = option(None, "default: in memory when it fits", flags=("--in-memory/--stream",),
                                    check=a_bool, suite="probe.in_memory", run_option=True)
    device: str = option("auto", "auto | cpu | cuda", check=a_device, run_option=True)
    workers: int = option(0, "reader processes when streaming", check=an_int(0), suite="probe.workers", run_option=True)
    allow_incomplete: bool = option(False, "use the finished chunks of incomplete stores", check=a_bool)
    out: str | None = option(None, "append one JSON line per head and seed to this file", check=a_str,
                             run_option=True)
    save_heads: str | None = option(None, "save each chosen head under this directory", check=a_str,
                                    run_option=True)
    knn_k: list[int] = option(list(DINO_KS), "kNN heads: neighbour counts, comma list", kind="list", item=int,
                              check=a_list(an_int(1)), suite="evaluations.knn_k")
    knn_t: list[float] = option([DINO_T], "kNN heads: temperatures of the weighted vote, comma list", kind="list",
                                item=float, check=a_list(positive), suite="evaluations.knn_t")
    knn_vote: list[str] = option(list(DEFAULT_VOTES), "kNN heads: votes scored, comma list: weighted (DINO's, "
                                 "exp(s/T)) and/or majority (1 per neighbour)", kind="list",
                                 check=a_list(one_of(*VOTES), unique=True), suite="evaluations.knn_vote")
    pool_from: list[str] = option([], "kNN over the pooled vector of a saved head (a --save-heads directory), "
                                  "repeatable", kind="repeat", flags=("--pool-from",))
    memory: int = option(DEFAULT_MEMORY, "memory budget of a kNN search, e.g. 512M, 4G", kind="size", check=a_size, suite="probe.memory",
                         run_option=True)
    checkpoint_every: float = option(300.0, "with --out: seconds between checkpoints of the grid in training (0: "
                                     "every epoch); the same command resumes a killed run", check=a_float(0),
                                     suite="probe.checkpoint_every", run_option=True)
    quiet: bool = option(False, "no progress bars or notes", check=a_bool, run_option=True)
    verify_reads: bool = option(False, "check every chunk read against its checksum (streaming too; chunks loaded "
                                "into memory are always checked)", check=a_bool, suite="probe.verify_reads",
                                run_option=True)
    online: str | None = option(None, "the papers' protocol, to measure the cache against: train on tokens the "
                                "backbone computes in the loop from this DATA (the train store's dataset), a fresh "
                                "crop every epoch; choose and evaluate on the cached center crops (slow)", check=a_str)
    online_augment: bool = option(True, "with --online: RandomResizedCrop+flip, or the center crop recomputed every "
                                  "epoch (--no-online-augment)", check=a_bool)
    center_view: bool = option(False, "with a --views store: draw each sample's training input from the center crop "
                               "and the K views (K = 1 or 4 views alone train worse than the center crop: "
                               "docs/protocol.md)", check=a_bool)
    grid_search: str = option("full", "SGD heads' lr x wd grid: full (every member trains the whole schedule) | "
                              "halving (successive halving: at each rung only the best --keep fraction on the "
                              "validation rows goes on; docs/protocol.md)", check=one_of(*SEARCHES),
                              suite="evaluations.grid_search")
    halving_rungs: list[float] = option(list(DEFAULT_RUNGS), "with --grid-search halving: the rungs, as increasing "
                                        "fractions of the schedule's steps, comma list", kind="list", item=float,
                                        check=a_list(a_fraction), suite="evaluations.halving_rungs")
    keep: float = option(DEFAULT_KEEP, "with --grid-search halving: the fraction of the members still training that "
                         "each rung keeps (at least one)", check=a_fraction, suite="evaluations.keep", show="1/3")


def validate(opts: ProbeOptions) -> None:
    """Every check of the options alone (no store opened): one UserError line for the first problem."""
    check_fields(opts)
    if sum(x is not None for x in (opts.shots, opts.fraction, opts.subset)) > 1:
        raise UserError("--shots, --fraction and --subset are alternatives: give one")
    if not opts.seeds:
        raise UserError("--seeds: give at least one seed")
    if opts.optimizer == "lbfgs" and len(opts.lrs) > 1:
        raise UserError("--lr: --optimizer lbfgs has no learning rate (its fits do not depend on one); give the L2 "
                        "grid with --l2")
    if opts.val_fraction == 0:
        for flag, values in (("--lr", opts.lrs), ("--wd", opts.wds), ("--l2", opts.l2)):
            if len(values) > 1:
                raise UserError(f"{flag}: --val-fraction 0 leaves nothing to choose a grid point on: give one value "
                                "(or none, for the documented default point)")
    if any(b <= a for a, b in zip(opts.halving_rungs, opts.halving_rungs[1:])):
        raise UserError(f"--halving-rungs {fmt(opts.halving_rungs)}: give increasing fractions of the schedule")
