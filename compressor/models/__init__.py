"""Registered models. Model-specific knowledge lives only in the family files here."""

from compressor.models._registry import finetune_lr, get_model, list_models, register_model
from compressor.models._spec import PrunableUnit
from compressor.models import vgg, mobilenet_v1, mobilenet_v2, squeezenet, resnet_cifar  # noqa: F401  (registers its builders)

__all__ = ["finetune_lr", "get_model", "list_models", "register_model", "PrunableUnit"]
