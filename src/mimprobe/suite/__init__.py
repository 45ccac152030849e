"""`mimprobe suite`: a whole comparison (models × datasets × evaluations × training sets × seeds) from one TOML
file: extraction, evaluation cells with keys (resumable, never duplicated), and one report. See docs/suite.md."""

from mimprobe.suite.plan import SuitePlan, make_plan
from mimprobe.suite.run import STAGES, SuiteOutcome, dry_run, run_suite
from mimprobe.suite.slurm import write_slurm
from mimprobe.suite.parse import load_suite
from mimprobe.suite.spec import Suite, SuiteInvalid

__all__ = ["STAGES", "Suite", "SuiteInvalid", "SuiteOutcome", "SuitePlan", "dry_run", "load_suite", "make_plan",
           "run_suite", "write_slurm"]
