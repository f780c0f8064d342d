from .schedulers import (
    build_scheduler,
    describe_training_objective,
    few_step_sampler_name,
    scheduler_class,
    scheduler_family,
)
from .text_encoders import (
    DEFAULT_TEXT_ENCODER_PACKAGE,
    check_max_sequence_length,
    default_text_encoder_path,
    load_default_text_encoder,
    load_text_encoder,
    text_encoder_fingerprint,
)

__all__ = [
    "DEFAULT_TEXT_ENCODER_PACKAGE",
    "build_scheduler",
    "check_max_sequence_length",
    "default_text_encoder_path",
    "describe_training_objective",
    "few_step_sampler_name",
    "load_default_text_encoder",
    "load_text_encoder",
    "scheduler_class",
    "scheduler_family",
    "text_encoder_fingerprint",
]
