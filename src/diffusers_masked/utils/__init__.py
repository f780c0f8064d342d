from .schedulers import build_scheduler, scheduler_class
from .text_encoders import DEFAULT_TEXT_ENCODER_PACKAGE, default_text_encoder_path, load_default_text_encoder

__all__ = ["build_scheduler", "scheduler_class", "DEFAULT_TEXT_ENCODER_PACKAGE", "default_text_encoder_path", "load_default_text_encoder"]
