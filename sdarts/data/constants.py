"""Per-channel normalisation statistics, in [0, 1] pixel units: the one definition that the loaders, the
timm export (its pretrained config) and the benchmark scripts share. Plain tuples, no torch."""
from __future__ import annotations

#: CIFAR-10 training set
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
#: ImageNet-1k (torchvision's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
