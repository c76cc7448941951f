"""Plans tuned to a model: schedules, evaluation times and coefficients fitted from teacher runs.

A tuned plan is an ordinary :class:`pyengine.plan.Plan` (float64 tables), so it runs on
every backend and in every mode at the cost of its base solver.
"""

# the tuned-plan file (artifact.py) and the schedule-only baseline (gits.py)
from .artifact import (TunedPlanFile, describe_process, load_plan, model_fingerprint,  # noqa: E402, F401
                       process_mismatch, save_plan)
from .gits import dp_path, gits_schedule, teacher_trajectory  # noqa: E402, F401
# the tunable plan, the differentiable walk and the fit (tunable.py, difwalk.py, fit.py)
from .fit import DEFAULT_TEACHER, TunedPlan, tune  # noqa: E402, F401
from .tunable import TunablePlan, consistency_systems  # noqa: E402, F401
