"""Model cards and Hub upload for trained pipelines (huggingface_hub's `ModelCard` and `upload_folder`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Dict

from .config import HubConfig
from .context import TrainContext

#: Files that stay local: resumable checkpoints, logs, the latent / text caches are not part of the published pipeline.
HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "logs/*", "latent_cache/*", "text_cache/*", "samples/*"]


def card_template_path(name: str) -> Path:
    """Path of a model card template shipped with the package (`model_cards/` at the repository top level)."""
    try:
        path = Path(str(resources.files("diffusers_masked.model_cards") / name))
        if path.is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    path = Path(__file__).resolve().parents[3] / "model_cards" / name
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {name} not found (looked in the package and {path.parent}).")
    return path


def _pipeline_tag(model: Any) -> str:
    if model.config.get("caption_channels") is not None:
        return "text-to-image"
    return "unconditional-image-generation" if model.config.get("num_classes") is None else "image-generation"


def card_fields(recipe: Any, ctx: TrainContext, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The template fields of the run's card: settings from the config, results from ``metrics``."""
    cfg, model = ctx.config, ctx.model
    m, o = cfg.model, cfg.optim
    fields = dict(
        repo_id=cfg.hub.hub_model_id or Path(cfg.output_dir).name,
        model_class=type(model).__name__,
        pipeline_class=recipe.pipeline_cls.__name__,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        model_config="\n".join(f"{k}: {v}" for k, v in model.config.items() if not k.startswith("_")),
        dataset=cfg.data.dataset_name or cfg.data.train_data_dir or "Fashion-MNIST (Debian dataset-fashion-mnist)",
        resolution=ctx.data.resolution,
        vae=cfg.data.vae_path or "none (pixel space)",
        objective=ctx.objective.name,
        scheduler=type(ctx.objective.inference_scheduler()).__name__,
        mask_ratio=m.mask_ratio if m.mask_ratio is not None else recipe.default_mask_ratio,
        unmasked_finetune_steps=m.unmasked_finetune_steps,
        max_train_steps=o.max_train_steps,
        train_batch_size=o.train_batch_size,
        num_processes=ctx.num_processes,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        learning_rate=o.learning_rate,
        mixed_precision=ctx.accelerator.mixed_precision,
        use_ema=o.use_ema,
        ema_decay=o.ema_decay,
        final_loss=f"{metrics.get('final_loss', float('nan')):.4f}",
        train_time=f"{metrics.get('train_time_s', 0) / 60:.1f} min",
        images_per_s=f"{metrics.get('images_per_s', 0):.1f}",
        class_names=", ".join(ctx.class_names or []) or "unconditional",
        metrics="\n".join(f"- {k}: {v}" for k, v in metrics.items()),
    )
    fields.update(_text_fields(ctx))
    if ctx.text is not None:
        fields["dataset"] = ctx.text.dataset_name
    fields.update(recipe.card_fields(ctx))
    return fields


def _text_fields(ctx: TrainContext) -> Dict[str, Any]:
    """``conditioning`` (text / class / unconditional), ``text_encoder`` and ``example_prompt`` of the card."""
    config, text = ctx.model.config, ctx.text
    if config.get("caption_channels") is not None:
        conditioning = "text"
    else:
        conditioning = "class" if config.get("num_classes") else "unconditional"
    prompts = text.validation_prompts if text is not None else []
    return dict(conditioning=conditioning, text_encoder=text.encoder_name if text is not None else "none",
                example_prompt=prompts[0] if prompts else "a bag at top left and a sneaker at bottom right")


def write_model_card(recipe: Any, ctx: TrainContext, metrics: Dict[str, Any]) -> Path:
    """Fill the recipe's card template (or the LoRA one) with the run's settings and results and write
    OUTPUT_DIR/README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg, model = ctx.config, ctx.model
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        pipeline_tag=_pipeline_tag(model),
        tags=["diffusers", "diffusers-masked", recipe.name, "masked-diffusion-transformer"],
        datasets=[cfg.data.dataset_name] if cfg.data.dataset_name else None,
        base_model=cfg.model.pretrained_model_name_or_path,
    )
    fields = card_fields(recipe, ctx, metrics)
    template = recipe.model_card
    m = cfg.model
    if m.lora_rank:
        template = "lora.md"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fields.update(base_model=m.pretrained_model_name_or_path, lora_rank=m.lora_rank,
                      lora_alpha=m.lora_alpha or m.lora_rank, lora_targets=m.lora_target_modules,
                      trainable_parameters=f"{trainable / 1e6:.3f}M")
        card_data.tags = card_data.tags + ["lora"]
    card = ModelCard.from_template(card_data, template_path=str(card_template_path(template)), **fields)
    path = Path(cfg.output_dir) / "README.md"
    card.save(str(path))
    return path


def prepare_hub_upload(hub: HubConfig, folder: Path) -> Dict[str, Any]:
    """Arguments of the `upload_folder` call (separate so tests can check them without a network call)."""
    if not hub.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/maskdit-fashion-mnist).")
    return dict(
        repo_id=hub.hub_model_id,
        folder_path=str(folder),
        ignore_patterns=list(HUB_IGNORE_PATTERNS),
        commit_message="Upload pipeline trained with diffusers-masked",
        token=hub.hub_token,
    )


def push_to_hub(hub: HubConfig, folder: Path) -> str:
    """Create the repo if needed and upload the pipeline folder (not checkpoints, logs or caches)."""
    from huggingface_hub import create_repo, upload_folder

    upload = prepare_hub_upload(hub, folder)
    repo = create_repo(upload["repo_id"], token=hub.hub_token, private=hub.hub_private_repo, exist_ok=True)
    upload["repo_id"] = repo.repo_id
    upload_folder(**upload)
    return repo.repo_id
