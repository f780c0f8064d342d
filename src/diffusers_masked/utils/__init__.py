from .schedulers import build_scheduler, describe_training_objective, scheduler_class, scheduler_family
from .text_encoders import DEFAULT_TEXT_ENCODER_PACKAGE, default_text_encoder_path, load_default_text_encoder

__all__ = ["build_scheduler", "describe_training_objective", "scheduler_class", "scheduler_family", "DEFAULT_TEXT_ENCODER_PACKAGE", "default_text_encoder_path", "load_default_text_encoder"]
