"""Converters from the official MaskDiT and MDT / MDTv2 checkpoints to this package's models (MicroDiT: not yet)."""

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
]
