"""raykd's loss zoo: response, feature, relation and language-model distillation terms.

``LOSSES`` is the catalogue (key → :class:`LossSpec`), ``build_term`` makes one configured term,
``DistillLoss`` the weighted sum the train loop calls, ``describe_losses`` the ``raykd losses``
table. One file per family (mdistiller's layout): ``response.py``, ``feature.py``,
``relation.py``, ``language.py``; learned maps in ``connectors.py``.
"""

from raykd.losses.base import LossInputs, LossTerm, Param
from raykd.losses.composite import DistillLoss, feature_paths
from raykd.losses.registry import LOSSES, LossSpec, build_term, describe_losses

__all__ = ["LOSSES", "DistillLoss", "LossInputs", "LossSpec", "LossTerm", "Param", "build_term",
           "describe_losses", "feature_paths"]
