"""Ray Jobs entrypoint for `raykd distill`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/distill.py [ARGS]

ARGS are those of `raykd distill` (--config, --set KEY=VALUE, --summary PATH, ...). Inside a job
RAY_ADDRESS is set, so raykd joins the cluster instead of starting a local one. On a multi-node
cluster give an MLflow server (--set tracking.uri=http://MLFLOW:5000, or MLFLOW_TRACKING_URI in
the runtime env) and storage every node reaches (--set train.storage_path=s3://BUCKET/raykd);
see the README's "On a cluster". tests/test_submit.py submits this file.
"""

from _entry import run_verb  # the repository root on sys.path, then raykd's CLI

if __name__ == "__main__":
    run_verb("distill")
