"""Data shared by training and evaluation: the embedded Fashion-MNIST, image and captioned data sets, the VAE latent
cache and the text-embedding cache."""

from .captions import (
    DEFAULT_CAPTION_COLUMN,
    caption_dropout_mask,
    check_caption_columns,
    load_captioned_dataset,
    pick_captions,
    read_captions,
)
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    read_idx,
)
from .images import (
    PRELOAD_MAX_BYTES,
    ImageClassDataset,
    class_names,
    collate_batch,
    image_to_array,
    infer_image_geometry,
    load_image_dataset,
    resize_center_crop,
)
from .latents import LatentCacheDataset, build_latent_cache, sample_latents
from .scenes import (
    CAPTION_GRAMMAR,
    SceneSet,
    ensure_scenes,
    generate_scenes,
    layout_caption,
    load_scenes,
    parse_caption,
    write_scenes,
)
from .text_cache import (
    CaptionedImageDataset,
    TextCacheMismatchError,
    TextEmbeddingCache,
    build_text_cache,
    encode_captions,
    unconditional_embedding,
)

__all__ = [
    "CAPTION_GRAMMAR",
    "DEFAULT_CAPTION_COLUMN",
    "SceneSet",
    "ensure_scenes",
    "generate_scenes",
    "layout_caption",
    "load_scenes",
    "parse_caption",
    "write_scenes",
    "CaptionedImageDataset",
    "TextCacheMismatchError",
    "TextEmbeddingCache",
    "build_text_cache",
    "caption_dropout_mask",
    "check_caption_columns",
    "encode_captions",
    "load_captioned_dataset",
    "pick_captions",
    "read_captions",
    "unconditional_embedding",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PRELOAD_MAX_BYTES",
    "ImageClassDataset",
    "LatentCacheDataset",
    "build_latent_cache",
    "class_names",
    "collate_batch",
    "image_to_array",
    "infer_image_geometry",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "load_image_dataset",
    "read_idx",
    "resize_center_crop",
    "sample_latents",
]
