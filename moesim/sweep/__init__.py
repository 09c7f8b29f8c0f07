"""Parameter sweeps: ``--grid``/``--zip`` expansion and the local parallel runner (joblib/loky).

A Ray backend (``moesim[ray]``, ``--backend ray``) is not implemented yet.
"""

from moesim.sweep.grid import expand
from moesim.sweep.local import METRICS, SweepResult, plan_sweep, run_sweep, sweep_table

__all__ = ["expand", "run_sweep", "plan_sweep", "sweep_table", "SweepResult", "METRICS"]
