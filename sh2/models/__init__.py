"""StripedHyena 2 models in plain PyTorch (no torch.distributed).

The operator kinds (Hyena-SE, -MR, -LI, MHA) are listed in :mod:`sh2.models.operators`; each is one
:class:`~sh2.models.mixer.Mixer` subclass that declares everything the rest of sh2 needs to know about it.
"""

from sh2.models.config import PRESETS, SH2Config, available_presets, parse_layout
from sh2.models.freeze import freeze_parameters
from sh2.models.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from sh2.models.mixer import Mixer, OperatorKind
from sh2.models.model import SH2Block, SH2Model
from sh2.models.operators import OPERATORS, mixer_class, operator_kind
from sh2.models.params import parameter_groups

__all__ = ["SH2Config", "SH2Model", "SH2Block", "PRESETS", "available_presets", "parse_layout",
           "parameter_groups", "Mixer", "OperatorKind", "OPERATORS", "mixer_class", "operator_kind", "LoRAConfig",
           "LoRALinear", "apply_lora", "merge_lora", "freeze_parameters"]
