"""CLIP image towers on the Swift engine (frozen feature extractors for k-CLIP and DTM)."""
from .preprocess import CLIP_MEAN, CLIP_STD, ImageFolder, normalize, preprocess
from .vit import CLIPVisionTransformer, create_clip_vit, read_clip_state_dict
from .kclip import CLIPTokenizer, Reservoir, clip_teacher, from_clip, load_clip
from .resnet import ModifiedResNet, create_clip_resnet
