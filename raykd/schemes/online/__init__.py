"""Online distillation: members trained together teach each other (``raykd online``).

One file per scheme — ``dml.py``, ``one.py``, ``byot.py`` — says what it trains (its loss terms
and the members it is compared with alone); ``run.py`` runs any of them: one Ray Train fit of
the scheme's cohort (``raykd.models.cohort``), one MLflow child run per member.
"""
