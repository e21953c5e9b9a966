"""revformer: reversible Transformer language models that train with activation memory independent of depth."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_revformer import RevformerConfig
from .modeling_revformer import RevformerForCausalLM, RevformerModel, RevformerPreTrainedModel
from .conversion import ConversionError, convert_model, convert_to_revformer
from .export import ExportError, export_model

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained` finds revformer checkpoints once this package is imported...
AutoConfig.register(RevformerConfig.model_type, RevformerConfig)
AutoModel.register(RevformerConfig, RevformerModel)
AutoModelForCausalLM.register(RevformerConfig, RevformerForCausalLM)
# ...and `save_pretrained` writes `auto_map` plus the model code, so that a folder or Hub repo also loads with
# `trust_remote_code=True` where revformer is not installed.
RevformerConfig.register_for_auto_class()
RevformerModel.register_for_auto_class("AutoModel")
RevformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ConversionError",
    "ExportError",
    "RevformerConfig",
    "RevformerForCausalLM",
    "RevformerModel",
    "RevformerPreTrainedModel",
    "__version__",
    "convert_model",
    "convert_to_revformer",
    "export_model",
]
