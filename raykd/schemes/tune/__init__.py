"""`raykd tune`: a Ray Tune search over distillation values, one teacher and one cache for all.

``search.py`` checks the ``tune`` section, sizes the trials and drives the search (and its
resume); ``space.py`` parses the search space; ``tuner.py`` builds the Tuner (searcher,
scheduler); ``trial.py`` is one trial (a Ray Train run of the student, its MLflow child run);
``finish.py`` is what happens after the search (trial rows, best trial, best config, summary);
``plots.py`` draws it.
"""

from raykd.schemes.tune.search import (DEFAULT_STORAGE, KNOWN_METRICS, STATE_FILE,
                                       check_tune_config, config_digest, find_search, run_tune,
                                       run_tune_command, size_trials)

__all__ = ["DEFAULT_STORAGE", "KNOWN_METRICS", "STATE_FILE", "check_tune_config", "config_digest",
           "find_search", "run_tune", "run_tune_command", "size_trials"]
