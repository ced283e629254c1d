#!/usr/bin/env python
"""Hinton, Vinyals & Dean (2015) §3 on MNIST as a ready raykd job.

Trains (or reuses) the 1200-1200 teacher, trains the 800-800 baseline and the 800-800 student
distilled at T=20, then the omitted-class and two-class transfer experiments with bias shifts
chosen on validation data — all through raykd's pipeline (teacher actor, Ray Train workers,
MLflow, one parent run). The same job as ``raykd hinton-mnist``; every argument is passed on:

    python jobs/hinton_mnist.py --data-root ../shared/data/mnist \\
        --summary hinton_mnist.json --markdown hinton_mnist.md
    python jobs/hinton_mnist.py --data-root ../shared/data/mnist --set hinton.experiments=[omitted]
    ray job submit --working-dir . -- python jobs/hinton_mnist.py --data-root /data/mnist

Options: --config PATH (default configs/mnist_hinton_distill.yaml), --set KEY=VALUE (repeatable;
hinton.* keys set the job section), --data-root DIR, --summary PATH (JSON), --markdown PATH,
--resume (continue the last run of this job, keeping its finished fits).
"""

from _entry import run_verb  # the repository root on sys.path, then raykd's CLI

if __name__ == "__main__":
    run_verb("hinton-mnist")
