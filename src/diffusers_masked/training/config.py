"""The typed configuration of a training run, grouped by concern.

`cli.parse_args` builds a `TrainConfig` from the command line once; everything below the entry point reads these
dataclasses, never the argparse namespace. Field names are the flag names (``--learning_rate`` ->
``OptimConfig.learning_rate``), so a flag and its field cannot drift apart, and `from_namespace` refuses a flag that
no section claims. Each recipe adds its own small dataclass (`RecipeConfig` subclass) as ``TrainConfig.recipe``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Type


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become training samples (``data`` flags)."""

    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    train_data_dir: Optional[str] = None
    fashion_mnist_dir: Optional[str] = None
    image_column: str = "image"
    label_column: str = "label"
    max_train_samples: Optional[int] = None
    resolution: Optional[int] = None
    random_flip: bool = False
    in_channels: Optional[int] = None
    dataloader_num_workers: int = 0
    data_on_device: str = "auto"
    vae_path: Optional[str] = None
    cache_latents: bool = False
    latent_cache_dir: Optional[str] = None

    @property
    def uses_default_data(self) -> bool:
        """True when neither --dataset_name nor --train_data_dir is given: the embedded Fashion-MNIST."""
        return not (self.dataset_name or self.train_data_dir)


@dataclass(frozen=True)
class TextConfig:
    """Text-to-image settings (``text`` flags of the recipes that take captions: MaskDiT, MDTv2, DeferredMaskDiT).

    ``conditioning`` is resolved by `cli.parse_args`: an explicit ``--caption_column`` without ``--conditioning``
    means text. With text conditioning the data is captioned (``caption_source`` "captions": a caption column of the
    data set, by default the embedded Fashion-MNIST scenes) or, for DeferredMaskDiT's old mode, captions made from
    class names (``caption_source`` "class_names").
    """

    conditioning: str = "class"
    caption_source: str = "captions"
    caption_column: str = "text"
    caption_dropout_prob: Optional[float] = None
    text_encoder_path: Optional[str] = None
    max_sequence_length: int = 77
    text_cache_dir: Optional[str] = None
    scenes_dir: Optional[str] = None

    @property
    def uses_text(self) -> bool:
        return self.conditioning == "text"

    @property
    def captioned(self) -> bool:
        """Whether the data set's captions are read (and cached as embeddings), not class names."""
        return self.uses_text and self.caption_source == "captions"


@dataclass(frozen=True)
class ModelConfig:
    """Which transformer is trained, on which objective and how (``model and objective`` flags)."""

    model_config: Optional[str] = None
    pretrained_model_name_or_path: Optional[str] = None
    objective: str = "edm"
    mask_ratio: Optional[float] = None
    unmasked_finetune_steps: int = 0
    class_dropout_prob: Optional[float] = None
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_target_modules: str = "to_q,to_k,to_v,to_out.0"
    torch_compile: bool = False
    torch_compile_mode: str = "default"

    @property
    def compiles(self) -> bool:
        """Whether the transformer is compiled: --torch_compile, or any --torch_compile_mode but default."""
        return self.torch_compile or self.torch_compile_mode != "default"


@dataclass(frozen=True)
class OptimConfig:
    """Steps, batch, optimizer, learning-rate schedule and EMA (``optimisation`` flags)."""

    train_batch_size: int = 64
    max_train_steps: int = 1000
    stop_after_steps: Optional[int] = None
    max_train_time_minutes: Optional[float] = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = None
    use_ema: bool = False
    ema_decay: float = 0.9999


@dataclass(frozen=True)
class DistributedConfig:
    """Precision and multi-process settings."""

    mixed_precision: Optional[str] = None
    allow_tf32: bool = False
    ddp_comm_hook: str = "no"


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, where a run resumes."""

    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None


@dataclass(frozen=True)
class ValidationConfig:
    """Validation grids and in-training evaluation (Fréchet distance, conditional accuracy)."""

    validation_steps: int = 500
    validation_images_per_class: int = 4
    validation_inference_steps: int = 40
    validation_guidance_scale: float = 1.5
    validation_scheduler: Optional[str] = None
    eval_every_steps: int = 0
    eval_every_minutes: float = 0.0
    eval_num_samples: int = 1000
    eval_reference: str = "fashion-mnist"
    eval_feature: str = "fashion-mnist"
    eval_inception_weights: Optional[str] = None
    eval_batch_size: int = 250

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_every_steps or self.eval_every_minutes)


@dataclass(frozen=True)
class LoggingConfig:
    logging_steps: int = 10
    report_to: str = "tensorboard"
    logging_dir: str = "logs"


@dataclass(frozen=True)
class HubConfig:
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    hub_private_repo: bool = False


@dataclass(frozen=True)
class RecipeConfig:
    """Base of a recipe's own flags; a recipe subclasses it with one field per flag it adds."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run is configured with.

    Attributes:
        output_dir: The run's folder: pipeline, checkpoints, logs, samples.
        seed: Seeds the data order and every process's noise generator.
        explicit_flags: Flag names the user passed (a demo default is not one), for warnings about ignored flags.
        command_line: The arguments as given, to print a resume command.
    """

    output_dir: str = "output"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    explicit_flags: Tuple[str, ...] = ()
    command_line: Tuple[str, ...] = ()

    def replace(self, section: str, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied to one section (``cfg.replace("optim", use_ema=False)``)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def flat(self) -> Dict[str, Any]:
        """Every flag value by flag name (``learning_rate``: 1e-4, ...), for trackers."""
        values: Dict[str, Any] = {"output_dir": self.output_dir, "seed": self.seed}
        for name in SECTIONS:
            values.update(dataclasses.asdict(getattr(self, name)))
        values.update(dataclasses.asdict(self.recipe))
        return values


#: Sections of `TrainConfig` filled from flags, by attribute name.
SECTIONS: Dict[str, Type[Any]] = {
    "data": DataConfig, "text": TextConfig, "model": ModelConfig, "optim": OptimConfig, "distributed": DistributedConfig,
    "checkpoint": CheckpointConfig, "validation": ValidationConfig, "logging": LoggingConfig, "hub": HubConfig,
}


def from_namespace(
    namespace: argparse.Namespace, recipe_cls: Type[RecipeConfig], explicit_flags: List[str], command_line: List[str]
) -> TrainConfig:
    """Sort parsed flags into the sections; a flag no section (nor the recipe's config) claims is a bug here."""
    values = dict(vars(namespace))

    def take(cls: Type[Any]) -> Any:
        return cls(**{f.name: values.pop(f.name) for f in fields(cls) if f.name in values})

    sections = {name: take(cls) for name, cls in SECTIONS.items()}
    recipe = take(recipe_cls)
    top = {name: values.pop(name) for name in ("output_dir", "seed")}
    if values:
        raise TypeError(f"Flags {sorted(values)} belong to no config section: add them to a dataclass in "
                        f"training/config.py or to the recipe's {recipe_cls.__name__}.")
    return TrainConfig(**top, **sections, recipe=recipe, explicit_flags=tuple(explicit_flags),
                       command_line=tuple(command_line))
