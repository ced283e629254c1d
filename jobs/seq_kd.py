"""Ray Jobs entrypoint for `raykd seq-kd` (sequence-level knowledge distillation).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/seq_kd.py [ARGS]

ARGS are those of `raykd seq-kd` (--config, --set KEY=VALUE, --summary PATH). Inside a job
RAY_ADDRESS is set, so raykd joins the cluster instead of starting a local one. On a multi-node
cluster give an MLflow server (--set tracking.uri=http://MLFLOW:5000) and a teacher.cache_dir on
storage every node shares: the workers read the generated dataset from there.
"""

from _entry import run_verb  # the repository root on sys.path, then raykd's CLI

if __name__ == "__main__":
    run_verb("seq-kd")
