"""Small SH2 models with non-trivial weights for the inference tests."""

from __future__ import annotations

import lightning as L
import torch

from sh2.inference.predict import predict_batch
from sh2.models import SH2Config, SH2Model


def make_model(layout: str, seed: int = 0, **overrides) -> SH2Model:
    """A small model with non-trivial filters, skips and biases (init leaves MR filters ~1e-5)."""
    fields = dict(hidden_size=32, num_layers=len(layout), num_heads=2, mlp_hidden_size=64, layout=layout,
                  se_groups=4, mr_groups=4, mr_filter_len=16, mr_ref_len=64, mlp_activation="evo2")
    torch.manual_seed(seed)
    model = SH2Model(SH2Config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("filter.h", "filter.R", "bias")):
                p.normal_(0, 0.3)
            elif name.endswith("skip"):
                p.normal_()
            elif p.dim() == 2 and "embedding" not in name:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


class PredictWrapper(L.LightningModule):
    """Stands in for SH2LightningModule in predict tests: ``predict_step`` is the module's one-liner."""

    def __init__(self, model: SH2Model) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return predict_batch(self.model, batch)
