"""Data: the built-in digits, array and image-folder datasets, a prefetching loader, token caches."""
from .datasets import (IMG_EXTENSIONS, ArrayDataset, ImageFolder, ImageLoadError, Subset, check_same_classes,
                       dataset_targets, digits_split, load_digits, split_dataset)
from .loader import DataLoader
from .token_cache import TokenCache, TokenCacheError, TokenDataset, tokenizer_fingerprint
from .transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize, random_resized_crop_params,
                         resize_bilinear, sample_rng)

__all__ = ["load_digits", "digits_split", "ArrayDataset", "ImageFolder", "ImageLoadError", "IMG_EXTENSIONS",
           "Subset", "split_dataset", "check_same_classes", "dataset_targets",
           "DataLoader", "TokenCache", "TokenCacheError", "TokenDataset", "tokenizer_fingerprint",
           "resize_bilinear", "random_resized_crop_params", "sample_rng", "normalize",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]
