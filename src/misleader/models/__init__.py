"""The model zoo. Importing this package registers every architecture."""

from misleader.models.base import (
    MODELS,
    Classifier,
    Normalize,
    count_parameters,
    create_model,
    list_models,
    register_model,
)
from misleader.models import lenet  # noqa: F401  (registers lenet5*)
from misleader.models import densenet, mobilenet_v2, resnet_8x  # noqa: F401  (register the CIFAR models)
from misleader.models.generators import (
    GENERATORS,
    DCGANDiscriminator,
    DCGANGenerator,
    GeneratorA,
    tanh_to_unit,
)

__all__ = [
    "GENERATORS",
    "MODELS",
    "Classifier",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GeneratorA",
    "Normalize",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
    "tanh_to_unit",
]
