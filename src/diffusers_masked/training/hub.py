"""Model cards and Hub upload for trained pipelines (huggingface_hub's `ModelCard` and `upload_folder`)."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any, Dict

#: Files that stay local: resumable checkpoints, logs and the latent cache are not part of the published pipeline.
HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "logs/*", "latent_cache/*", "samples/*"]


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


def _pipeline_tag(args: argparse.Namespace, model: Any) -> str:
    if getattr(args, "conditioning", "class") == "text":
        return "text-to-image"
    return "unconditional-image-generation" if model.config.get("num_classes") is None else "image-generation"


def write_model_card(trainer: Any, metrics: Dict[str, Any]) -> Path:
    """Fill the recipe's card template with the run's settings and results and write OUTPUT_DIR/README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    args = trainer.args
    model = trainer.unwrapped_model
    data = args.dataset_name or args.train_data_dir or "Fashion-MNIST (Debian dataset-fashion-mnist)"
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        pipeline_tag=_pipeline_tag(args, model),
        tags=["diffusers", "diffusers-masked", trainer.recipe.name, "masked-diffusion-transformer"],
        datasets=[args.dataset_name] if args.dataset_name else None,
        base_model=args.pretrained_model_name_or_path,
    )
    fields = dict(
        repo_id=args.hub_model_id or Path(args.output_dir).name,
        model_class=type(model).__name__,
        pipeline_class=trainer.recipe.pipeline_cls.__name__,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        model_config="\n".join(f"{k}: {v}" for k, v in model.config.items() if not k.startswith("_")),
        dataset=data,
        resolution=trainer.resolution,
        vae=args.vae_path or "none (pixel space)",
        objective=trainer.objective.name,
        scheduler=type(trainer.objective.inference_scheduler()).__name__,
        mask_ratio=args.mask_ratio if args.mask_ratio is not None else trainer.recipe.default_mask_ratio,
        unmasked_finetune_steps=args.unmasked_finetune_steps,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        num_processes=trainer.accelerator.num_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        mixed_precision=trainer.accelerator.mixed_precision,
        use_ema=args.use_ema,
        ema_decay=args.ema_decay,
        final_loss=f"{metrics.get('final_loss', float('nan')):.4f}",
        train_time=f"{metrics.get('train_time_s', 0) / 60:.1f} min",
        images_per_s=f"{metrics.get('images_per_s', 0):.1f}",
        class_names=", ".join(trainer.class_names or []) or "unconditional",
        metrics="\n".join(f"- {k}: {v}" for k, v in metrics.items()),
        **trainer.recipe.card_fields(trainer),
    )
    template = trainer.recipe.model_card
    if args.lora_rank:
        template = "lora.md"
        fields.update(base_model=args.pretrained_model_name_or_path, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha or args.lora_rank, lora_targets=args.lora_target_modules,
                      trainable_parameters=f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M")
        card_data.tags = card_data.tags + ["lora"]
    card = ModelCard.from_template(card_data, template_path=str(card_template_path(template)), **fields)
    path = Path(args.output_dir) / "README.md"
    card.save(str(path))
    return path


def prepare_hub_upload(args: argparse.Namespace, folder: Path) -> Dict[str, Any]:
    """Arguments of the `upload_folder` call (separate so tests can check them without a network call)."""
    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/maskdit-fashion-mnist).")
    return dict(
        repo_id=args.hub_model_id,
        folder_path=str(folder),
        ignore_patterns=list(HUB_IGNORE_PATTERNS),
        commit_message="Upload pipeline trained with diffusers-masked",
        token=args.hub_token,
    )


def push_to_hub(args: argparse.Namespace, folder: Path) -> str:
    """Create the repo if needed and upload the pipeline folder (not checkpoints, logs or caches)."""
    from huggingface_hub import create_repo, upload_folder

    upload = prepare_hub_upload(args, folder)
    repo = create_repo(upload["repo_id"], token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
    upload["repo_id"] = repo.repo_id
    upload_folder(**upload)
    return repo.repo_id
