"""raykd's models: a registry of classifiers, feature hooks by module path, and teacher→student
weight initialisation. See docs/CONTRACTS.md; module paths per model are in each model class's
docstring (``MLP``, ``SmallCNN``, ``CifarResNet``, ``WideResNet``, ``TinyTransformer``).
"""

from raykd.models.hooks import FeatureHooks, probe_shapes, resolve_module
from raykd.models.init import init_student_from_teacher
from raykd.models.registry import (
    MODELS,
    build_model,
    count_params,
    example_input,
    is_known_model,
    model_names,
)

__all__ = [
    "MODELS",
    "FeatureHooks",
    "build_model",
    "count_params",
    "example_input",
    "init_student_from_teacher",
    "is_known_model",
    "model_names",
    "probe_shapes",
    "resolve_module",
]
