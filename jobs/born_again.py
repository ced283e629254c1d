"""Ray Jobs entrypoint for `raykd born-again`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/born_again.py [ARGS]

ARGS are those of `raykd born-again` (--config, --set KEY=VALUE, --summary PATH, --resume, ...).
Inside a job RAY_ADDRESS is set, so raykd joins the cluster instead of starting a local one. On a
multi-node cluster give an MLflow server: --set tracking.uri=http://MLFLOW:5000.
"""

import sys

from raykd.cli import main

if __name__ == "__main__":
    sys.exit(main(["born-again", *sys.argv[1:]]))
