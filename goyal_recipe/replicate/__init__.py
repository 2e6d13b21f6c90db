"""`goyal-replicate`: the paper's experiments at a scale one machine affords, with the evidence written out.

Every run is `recipes/replication/base.yaml` plus only what the paper changes between its runs:
kn, the warmup, the LR scaling rule and the zero-gamma init (and, in the scaling study, the optimizer).
A mode fixes the scale (data set size, epochs and milestones in the paper's 90 / 30, 60, 80
proportions, warmup, the kn range, seeds); the BN group stays fixed at every kn (ghost BN), and kn
beyond the per-device micro-batch is reached by gradient accumulation, exactly as the paper simulated
its largest minibatches.

    goyal-replicate --mode quick          # < 15 min on 2 CPU cores: docs/replication/quick/
    goyal-replicate --mode cpu            # Table 1 at 125 updates per epoch: about an hour on 2 CPU cores
    goyal-replicate --mode scaling        # where linear scaling ends: SGD and LARS against kn, B_simple measured
    goyal-replicate --mode full --jobs 2  # the whole design, for a GPU
    goyal-replicate --mode quick --dry-run

Finished runs are not repeated and unfinished ones resume, so the command can be rerun after an
interruption. The report (markdown tables beside the paper's numbers, figures, a JSON of every run's
per-epoch errors) is rebuilt from the runs' `metrics.jsonl` files.

design.py: the settings, modes and runs (one validated recipe each); runner.py: training them and the
command line; report.py: records, summaries, tables and figures; scaling.py: the scaling study's report
and the rules of its reading.
"""

from .design import BASE_RECIPE, MODES, Mode, Run, Setting, build_runs
from .report import collect, paper_kn_at, summarise, write_report
from .runner import main, run_all, train_command

__all__ = ["BASE_RECIPE", "MODES", "Mode", "Run", "Setting", "build_runs", "collect", "main", "paper_kn_at",
           "run_all", "summarise", "train_command", "write_report"]
