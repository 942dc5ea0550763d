"""CLIP image towers on the Swift engine (frozen feature extractors for k-CLIP and DTM)."""
from .resnet import ModifiedResNet, create_clip_resnet
