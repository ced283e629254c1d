"""The one way into raykd for every ``jobs/*.py``: ``run_verb("distill")`` runs
``raykd distill ARGS`` with the job's own arguments, raykd imported from this checkout.

The repository root goes first on ``sys.path``, so the jobs run from a checkout that was never
installed (``python jobs/distill.py``, or ``ray job submit --working-dir . -- python
jobs/distill.py`` with a Python that has raykd's dependencies but not raykd), and an installed
raykd elsewhere never shadows the code beside the job. A job imports this module by its bare
name: Python puts the script's folder, ``jobs/``, first on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_verb(verb: str) -> None:
    if sys.path[:1] != [str(REPO)]:
        sys.path.insert(0, str(REPO))
    from raykd.cli import main

    sys.exit(main([verb, *sys.argv[1:]]))
