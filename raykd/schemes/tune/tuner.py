"""The Ray Tune ``Tuner`` of `raykd tune`: its search algorithm, its scheduler, its run config.

Schedulers count time in ``training_iteration``, which is epochs: a trial reports to Tune once
per epoch (each epoch's ``ray.train.report`` is forwarded), and a trial restored from a Tune
checkpoint (PBT's exploits) continues Tune's count from that checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

from raykd.config import RaykdConfig
from raykd.schemes.tune.space import Dim, param_space

TIME_ATTR = "training_iteration"


def searcher(cfg: RaykdConfig):
    tc = cfg.tune
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to its own default generator: pass it here.
    return BasicVariantGenerator(random_state=cfg.train.seed,
                                 max_concurrent=tc.max_concurrent_trials)


def scheduler(cfg: RaykdConfig, dims: list[Dim]):
    tc, epochs = cfg.tune, cfg.train.epochs
    if tc.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr=TIME_ATTR, max_t=epochs,
                             grace_period=min(tc.grace_period, epochs),
                             reduction_factor=tc.reduction_factor)
    if tc.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        return PopulationBasedTraining(time_attr=TIME_ATTR, perturbation_interval=tc.grace_period,
                                       hyperparam_mutations={d.key: d.mutation() for d in dims},
                                       synch=tc.synch)
    return None


def build_tuner(cfg: RaykdConfig, dims: list[Dim], folder: Path, trainable, restore: bool):
    """A new Tuner for the search in ``folder``, or (``restore``) the one saved there."""
    from ray import tune

    tc = cfg.tune
    if restore:  # the run config is restored with the Tuner
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    num_samples = 1 if tc.search == "grid" else tc.num_samples
    return tune.Tuner(
        trainable,
        param_space=param_space(dims, tc.search),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, search_alg=searcher(cfg),
            scheduler=scheduler(cfg, dims), num_samples=num_samples,
            max_concurrent_trials=tc.max_concurrent_trials if tc.search == "optuna" else None),
        run_config=tune.RunConfig(
            name=folder.name, storage_path=str(folder.parent), verbose=1,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=4 if tc.scheduler == "pbt" else 1),
            failure_config=tune.FailureConfig(max_failures=0)))
