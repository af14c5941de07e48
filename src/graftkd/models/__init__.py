"""Model zoo: every model splits into blocks whose composition is the model (the grafting contract).

Importing this package registers all architectures; build one with ``build_model(name, num_classes)``.
"""
from graftkd.models import digits, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registration)
from graftkd.models import (  # noqa: F401  (registration: the CIFAR-100 benchmark zoo)
    mobilenetv2,
    resnet50_cifar,
    resnet_repdistiller,
    shufflenet,
    vgg_repdistiller,
    wrn,
)
from graftkd.models import hybrid  # noqa: F401,E402  (registration: partial-grafting hybrids; after the zoo)
from graftkd.models.base import BlockModel, check_block_contract
from graftkd.models.profile import count_flops, count_params, format_count
from graftkd.models.registry import MODEL_REGISTRY, build_model, list_models, register_model

__all__ = [
    "MODEL_REGISTRY",
    "BlockModel",
    "build_model",
    "check_block_contract",
    "count_flops",
    "count_params",
    "format_count",
    "list_models",
    "register_model",
]
