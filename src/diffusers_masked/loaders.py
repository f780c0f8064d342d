"""LoRA loading for the pipelines of this package, on top of diffusers' `LoraBaseMixin`.

`LoraBaseMixin` already gives `fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `set_adapters`, `disable_lora`,
`enable_lora`, `delete_adapters` and `get_active_adapters`; this mixin adds the transformer-only loading and saving
(the transformers themselves get `load_lora_adapter` & co. from diffusers' `PeftAdapterMixin`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict

from .models.modeling_common import explain_weights_error

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class MaskedTransformerLoraLoaderMixin(LoraBaseMixin):
    """``pipe.load_lora_weights(path_or_dict, adapter_name=...)`` / ``Pipeline.save_lora_weights(dir, layers)``."""

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]], **kwargs: Any
    ):
        """The LoRA state dict (and, with ``return_lora_metadata=True``, its adapter metadata) from a folder, a file,
        a Hub id or a dict."""
        return_metadata = kwargs.pop("return_lora_metadata", False)
        path = pretrained_model_name_or_path_or_dict
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            kwargs.setdefault("weight_name", os.path.basename(path))
            path = os.path.dirname(os.path.abspath(path))
        use_safetensors = kwargs.pop("use_safetensors", None)
        try:
            state_dict, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=path,
                weight_name=kwargs.pop("weight_name", None),
                use_safetensors=True if use_safetensors is None else use_safetensors,
                local_files_only=kwargs.pop("local_files_only", None),
                cache_dir=kwargs.pop("cache_dir", None),
                force_download=kwargs.pop("force_download", False),
                proxies=kwargs.pop("proxies", None),
                token=kwargs.pop("token", None),
                revision=kwargs.pop("revision", None),
                subfolder=kwargs.pop("subfolder", None),
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=use_safetensors is None,
            )
        except OSError as err:
            explained = explain_weights_error(err, "LoRA weights")
            if explained is None:
                raise
            raise explained from explained.__cause__
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load LoRA weights (a folder with `pytorch_lora_weights.safetensors`, a file, a Hub id or a state dict) into
        the transformer as adapter ``adapter_name``."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs)
        if not state_dict or not all("lora" in k for k in state_dict):
            raise ValueError("Not a LoRA checkpoint: every parameter name must contain 'lora'.")
        self.load_lora_into_transformer(state_dict, self.transformer, adapter_name=adapter_name, metadata=metadata,
                                        _pipeline=self, hotswap=hotswap)

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: Dict[str, torch.Tensor],
        transformer,
        adapter_name: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        _pipeline=None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Check the LoRA matches the transformer (module names and shapes), then load it with peft."""
        check_lora_matches_model(state_dict, transformer)
        transformer.load_lora_adapter(state_dict, network_alphas=None, adapter_name=adapter_name, metadata=metadata,
                                      _pipeline=_pipeline, hotswap=hotswap, low_cpu_mem_usage=low_cpu_mem_usage)

    def fuse_lora(self, components: Optional[list] = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Optional[list] = None, **kwargs: Any) -> None:
        """Merge the active LoRA weights into the transformer (``components`` defaults to the transformer)."""
        super().fuse_lora(components=components or ["transformer"], lora_scale=lora_scale, safe_fusing=safe_fusing,
                          adapter_names=adapter_names, **kwargs)

    def unfuse_lora(self, components: Optional[list] = None, **kwargs: Any) -> None:
        """Undo `fuse_lora`."""
        super().unfuse_lora(components=components or ["transformer"], **kwargs)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        transformer_lora_layers: Dict[str, torch.Tensor],
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Write the transformer's LoRA layers (e.g. `peft.get_peft_model_state_dict(transformer)`) to
        ``save_directory/pytorch_lora_weights.safetensors`` with the adapter config as metadata."""
        if not transformer_lora_layers:
            raise ValueError("transformer_lora_layers is empty: nothing to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )


def check_lora_matches_model(state_dict: Dict[str, torch.Tensor], transformer: torch.nn.Module) -> None:
    """Raise a ValueError naming every LoRA module that the transformer lacks or whose shape does not fit."""
    prefix = "transformer."
    modules = dict(transformer.named_modules())
    missing, wrong_shape = set(), []
    for key, tensor in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".lora_A" in name:
            module_name, which = name.split(".lora_A")[0], "A"
        elif ".lora_B" in name:
            module_name, which = name.split(".lora_B")[0], "B"
        else:
            continue
        module_name = module_name.replace(".base_layer", "")
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            missing.add(module_name)
            continue
        if tensor.dim() != 2:
            continue
        if which == "A" and tensor.shape[1] != base.in_features:
            wrong_shape.append(f"{module_name} (lora_A takes {tensor.shape[1]} inputs, the layer has {base.in_features})")
        if which == "B" and tensor.shape[0] != base.out_features:
            wrong_shape.append(f"{module_name} (lora_B gives {tensor.shape[0]} outputs, the layer has {base.out_features})")
    if missing or wrong_shape:
        parts = []
        if missing:
            parts.append(f"modules not in this {type(transformer).__name__}: {sorted(missing)[:20]}")
        if wrong_shape:
            parts.append(f"shape mismatches: {wrong_shape[:20]}")
        raise ValueError(
            "This LoRA does not fit the transformer (trained for another model or size?); " + "; ".join(parts) + "."
        )
