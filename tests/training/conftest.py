import lightning as L
import pytest

from sh2.data.datamodule import SH2DataModule
from sh2.training.module import SH2LightningModule

TINY_OVERRIDES = {"hidden_size": 32, "num_layers": 4, "layout": "SDH*", "num_heads": 2, "mlp_hidden_size": 64,
                  "se_groups": 2, "mr_groups": 2, "mr_filter_len": 16, "mr_ref_len": 64}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def make_module(**kw) -> SH2LightningModule:
    return SH2LightningModule(**{"preset": "tiny", "overrides": TINY_OVERRIDES, "seq_len": 64, "lr": 1e-3,
                                 "warmup_steps": 2, "decay_steps": 100, **kw})


def make_data(**kw) -> SH2DataModule:
    return SH2DataModule(**{"seq_len": 64, "batch_size": 2, "val_batches": 2, "shuffle_buffer": 8, **kw})


def make_trainer(tmp_path, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "limit_val_batches": 0, "default_root_dir": str(tmp_path), "callbacks": list(callbacks),
                        "enable_checkpointing": False, "deterministic": True, **kw})


@pytest.fixture
def recorder():
    return LossRecorder()
