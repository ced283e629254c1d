"""Ray Jobs entrypoint for `raykd tune`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py [ARGS]

ARGS are those of `raykd tune` (--config, --set KEY=VALUE, --summary PATH, ...). Inside a job
RAY_ADDRESS is set, so raykd joins the cluster instead of starting a local one. On a multi-node
cluster give an MLflow server: --set tracking.uri=http://MLFLOW:5000.
"""

from _entry import run_verb  # the repository root on sys.path, then raykd's CLI

if __name__ == "__main__":
    run_verb("tune")
