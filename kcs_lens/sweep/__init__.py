"""Studies: many discovery runs (models x TargetKGs x seeds x ...) from one study file, run on this
machine or a Ray cluster, resumable, ending in one study report (``kcs-lens sweep``).

- :mod:`kcs_lens.sweep.runner`: :func:`run_sweep` (plan, executor, status).
- :mod:`kcs_lens.sweep.plan`: the study file -> validated cells with readable names; ``sweep.json``.
- :mod:`kcs_lens.sweep.cells`: one cell's state, running it (:func:`run_cell`), ``sweep status``.
- :mod:`kcs_lens.sweep.executors`: ``local`` worker processes and ``ray`` tasks.
- :mod:`kcs_lens.sweep.study`: the study report (``kcs-lens report DIR``).
"""

from kcs_lens.sweep.cells import run_cell
from kcs_lens.sweep.config import SweepConfig, parse_resources
from kcs_lens.sweep.plan import Cell, Plan, expand, is_study, load_plan
from kcs_lens.sweep.runner import run_sweep, status

__all__ = ["Cell", "Plan", "SweepConfig", "expand", "is_study", "load_plan", "parse_resources", "run_cell", "run_sweep", "status"]
