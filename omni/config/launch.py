"""Launch config: how `omni launch slurm` keeps a run alive across time limits and preemption."""

from __future__ import annotations

from dataclasses import dataclass

from omni.config.base import check


@dataclass
class LaunchConfig:
    """Requeueing on Slurm (recipes/slurm/train.sbatch.j2)."""

    max_requeues: int = 3
    """Stop requeueing after this many requeues in a row without a new checkpoint (a run that keeps failing)."""
    signal_lead: int = 120
    """Seconds before the time limit at which Slurm sends USR1 (the trainers save, the job requeues)."""

    def __post_init__(self) -> None:
        check(self.max_requeues >= 0, "max_requeues", self.max_requeues, ">= 0")
        check(self.signal_lead >= 1, "signal_lead", self.signal_lead, ">= 1 (seconds)")
