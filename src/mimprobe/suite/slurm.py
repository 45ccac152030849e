"""`mimprobe suite --slurm DIR`: the suite as SLURM jobs, following the README's pattern (one task per node
starting torchrun): ``extract.sbatch``, a job array with one task per store still to extract; ``evaluate.sbatch``,
every evaluation under torchrun, then a one-process pass for what torchrun cannot run (kNN heads) and the report;
``submit.sh`` submits both, the evaluations with ``--dependency=afterok`` on the whole array.
"""

from __future__ import annotations

import os
import shlex

from mimprobe.suite.plan import SuitePlan
from mimprobe.suite.stores import read_store

DEFAULTS = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 64, "time": "12:00:00", "port": 29500}


def _header(plan: SuitePlan, job: str, out_dir: str, log_name: str, array: str | None = None) -> list[str]:
    cfg = {**DEFAULTS, **plan.suite.slurm}
    lines = ["#!/bin/bash", f"#SBATCH --job-name=mimprobe-{job}-{plan.suite.name}"]
    if array is not None:
        lines.append(f"#SBATCH --array={array}")
    lines += [f"#SBATCH --nodes={cfg['nodes']}", "#SBATCH --ntasks-per-node=1"]
    if cfg["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={cfg['gpus_per_node']}")
    lines += [f"#SBATCH --cpus-per-task={cfg['cpus_per_task']}", f"#SBATCH --time={cfg['time']}",
              f"#SBATCH --output={os.path.join(out_dir, 'logs', log_name)}"]
    for key in ("partition", "account"):
        if key in cfg:
            lines.append(f"#SBATCH --{key}={cfg[key]}")
    lines += [f"#SBATCH {x.removeprefix('#SBATCH').strip()}" for x in cfg.get("sbatch", ())]
    return lines


def _torchrun(plan: SuitePlan, args: str, port: str) -> list[str]:
    cfg = {**DEFAULTS, **plan.suite.slurm}
    nproc = max(1, cfg["gpus_per_node"])
    return ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f"srun torchrun --nnodes=\"$SLURM_NNODES\" --nproc_per_node={nproc} --rdzv_id=\"$SLURM_JOB_ID\" \\",
            f"    --rdzv_backend=c10d --rdzv_endpoint=\"$head:{port}\" \\",
            f"    -m mimprobe suite {shlex.quote(plan.suite.path)} {args}"]


def _setup(plan: SuitePlan) -> list[str]:
    return ["set -euo pipefail", *plan.suite.slurm.get("setup", ())]


def write_slurm(plan: SuitePlan, out_dir: str) -> list[str]:
    """Write the job scripts into ``out_dir``; returns their paths (extract.sbatch only if a store is left)."""
    from mimprobe.probe.heads.base import is_knn

    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    cfg = {**DEFAULTS, **plan.suite.slurm}
    for sp in plan.stores:
        read_store(sp)
    left = [sp for sp in plan.stores if sp.status != "complete"]
    paths = []
    if left:
        lines = _header(plan, "extract", out_dir, "extract-%A_%a.out", ",".join(str(sp.index) for sp in left))
        lines += ["# one array task per store still to extract (task = the suite's extraction index):"]
        lines += [f"#   {sp.index:>4}  {sp.label} -> {sp.path}" for sp in left]
        lines += _setup(plan) + [f"port=$(({cfg['port']} + SLURM_ARRAY_TASK_ID % 1000))"]
        lines += _torchrun(plan, '--stage extract --store "$SLURM_ARRAY_TASK_ID" --quiet', "$port")
        paths.append(_write(os.path.join(out_dir, "extract.sbatch"), lines))
    elif os.path.exists(os.path.join(out_dir, "extract.sbatch")):  # from an earlier call: nothing left to extract
        os.remove(os.path.join(out_dir, "extract.sbatch"))
    lines = _header(plan, "evaluate", out_dir, "evaluate-%j.out")
    lines += ["# every evaluation cell still to do, distributed; then one process for the kNN heads (they do not",
              "# run under torchrun) and the report"]
    lines += _setup(plan) + _torchrun(plan, "--stage evaluate --quiet", str(cfg["port"]))
    if any(is_knn(h) for e in plan.suite.evaluations for h in e.heads):
        lines += [f"srun --nodes=1 --ntasks=1 python -m mimprobe suite {shlex.quote(plan.suite.path)} "
                  "--stage evaluate --quiet"]
    paths.append(_write(os.path.join(out_dir, "evaluate.sbatch"), lines))
    submit = ["#!/bin/bash",
              "# submit the suite: the extraction array, then the evaluations once every extraction succeeded",
              "set -euo pipefail", 'cd "$(dirname "$0")"', "mkdir -p logs"]
    if left:
        submit += ["extract=$(sbatch --parsable extract.sbatch)", 'extract="${extract%%;*}"',
                   'evaluate=$(sbatch --parsable --dependency=afterok:"$extract" evaluate.sbatch)',
                   'echo "extractions: job array $extract; evaluations: job ${evaluate%%;*} (after every '
                   'extraction succeeded)"']
    else:
        submit += ["evaluate=$(sbatch --parsable evaluate.sbatch)",
                   'echo "every store is extracted; evaluations: job ${evaluate%%;*}"']
    paths.append(_write(os.path.join(out_dir, "submit.sh"), submit))
    return paths


def _write(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path
