"""StripedHyena 2 models in plain PyTorch (no torch.distributed)."""

from sh2.models.config import PRESETS, SH2Config, available_presets, parse_layout
from sh2.models.model import SH2Block, SH2Model
from sh2.models.params import parameter_groups

__all__ = ["SH2Config", "SH2Model", "SH2Block", "PRESETS", "available_presets", "parse_layout",
           "parameter_groups"]
