"""Converters from the official MaskDiT, MDT / MDTv2 and MicroDiT checkpoints to this package's models."""

from .common import ConversionError, extract_state_dict, load_checkpoint_file, load_official_state_dict
from .maskdit import (
    config_from_official_state_dict as maskdit_config_from_official_state_dict,
    convert_maskdit_checkpoint,
    convert_maskdit_state_dict,
    load_maskdit_transformer,
    maskdit_scheduler,
)
from .mdt import (
    config_from_official_state_dict as mdt_config_from_official_state_dict,
    convert_mdt_checkpoint,
    convert_mdt_state_dict,
    detect_mdt_version,
    load_mdt_transformer,
    mdt_scheduler,
)
from .microdit import (
    config_from_official_state_dict as microdit_config_from_official_state_dict,
    convert_microdit_checkpoint,
    convert_microdit_state_dict,
    load_microdit_state_dict,
    load_microdit_transformer,
    microdit_scheduler,
)

__all__ = [
    "ConversionError",
    "convert_maskdit_checkpoint",
    "convert_maskdit_state_dict",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_maskdit_transformer",
    "load_official_state_dict",
    "maskdit_config_from_official_state_dict",
    "maskdit_scheduler",
    "convert_mdt_checkpoint",
    "convert_mdt_state_dict",
    "detect_mdt_version",
    "load_mdt_transformer",
    "mdt_config_from_official_state_dict",
    "mdt_scheduler",
    "convert_microdit_checkpoint",
    "convert_microdit_state_dict",
    "load_microdit_state_dict",
    "load_microdit_transformer",
    "microdit_config_from_official_state_dict",
    "microdit_scheduler",
]
