"""Shared backbones, created by name with :func:`create_model`."""

from models import cifar_resnet, unet, vgg  # noqa: F401  (registers the models)
from models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
