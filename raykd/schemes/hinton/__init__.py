"""Hinton, Vinyals & Dean (2015) §3 on MNIST (``raykd hinton-mnist``).

``job.py`` runs the three experiments (table, omitted class, two classes) under one MLflow parent
run; ``config.py`` loads and checks the job's configs (its ``hinton:`` section is part of
:class:`raykd.config.RaykdConfig`); ``resume.py`` keeps an interrupted job's finished fits
(``--resume``); ``report.py`` turns the summary into the paper's table; ``bias_shift.py`` chooses
and applies the per-class bias shift δ.
"""

from raykd.config_schemes import HINTON_EXPERIMENTS as EXPERIMENTS
from raykd.schemes.hinton.config import (JOB_SECTION, MAIN_CONFIG, HintonPlan,
                                         default_config_path, load_plan, preflight_plan)
from raykd.schemes.hinton.job import (count_test_errors, find_reusable_teacher,
                                      obtain_hinton_teacher, run_hinton,
                                      run_hinton_command, shift_experiment, teacher_key)
from raykd.schemes.hinton.report import (BENCHMARK_KEYS, PAPER, benchmark_record, gap_closed,
                                         markdown_table, table_of)

__all__ = ["BENCHMARK_KEYS", "EXPERIMENTS", "JOB_SECTION", "MAIN_CONFIG", "PAPER", "HintonPlan",
           "benchmark_record", "count_test_errors", "default_config_path",
           "find_reusable_teacher", "gap_closed", "load_plan", "markdown_table",
           "obtain_hinton_teacher", "preflight_plan", "run_hinton",
           "run_hinton_command", "shift_experiment", "table_of", "teacher_key"]
