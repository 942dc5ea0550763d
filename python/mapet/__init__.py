"""mapet: masked and permuted pre-training of Vision Transformers on a Swift engine.

Pre-train ViTs with MaPeT (masked and permuted two-stream pre-training), its MIM and PIM
baselines, CCViT and DTM; tokenize images with k-means; fine-tune and linear-probe. The
training loop is Python; every hot path runs in Swift; NumPy arrays cross without copies.
"""
from ._native import _core
from ._runtime import bf16_info, blas_info, get_num_threads, set_num_threads
from .profiling import profile
from . import ops
from .objectives import DTMSchedule, ccvit_corrupt, ccvit_pixel_targets, dtm_memberships, morph_tokens
from .sampling import BlockMaskGenerator, PermutationBatch, PermutationSampler
from . import checkpoint, config, data, interop, schedules, viz
from .models import VisionTransformer, create_model, load
from .optim import AdamW
from .pretrain_models import BEiT, CCViT, DTM, MaPeT
from .kmeans import KMeans
from .tokenizers import FeatureTokenizer, PixelTokenizer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "set_num_threads", "get_num_threads", "blas_info", "bf16_info", "profile", "ops",
    "DTMSchedule", "morph_tokens", "dtm_memberships", "ccvit_corrupt", "ccvit_pixel_targets",
    "PermutationSampler", "PermutationBatch", "BlockMaskGenerator",
    "VisionTransformer", "create_model", "load", "AdamW", "MaPeT", "BEiT", "CCViT", "DTM",
    "KMeans", "PixelTokenizer", "FeatureTokenizer",
]
