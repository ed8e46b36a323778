"""Lightning DeepSpeed checkpoint folders (``last.ckpt/latest``, ``checkpoint/*model_states.pt``,
``*optim_states.pt``) as ``init_from`` / ``load_pretrained`` input.

The folder detection and the errors run everywhere; reading real ZeRO-2/ZeRO-3 folders (written on the CPU by a
one-process gloo DeepSpeed engine laid out as Lightning's) runs where deepspeed is installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from sh2.checkpoints import CheckpointError, load_pretrained
from sh2.models import SH2Config
from sh2.models.model import SH2Model
from sh2.training.module import SH2LightningModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from cp_harness import run_distributed  # noqa: E402

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HPARAMS = {"preset": "tiny", "vocab_size": 512, "overrides": None}


def _fake_folder(root: Path) -> Path:
    """The file layout of a Lightning DeepSpeed checkpoint (contents: the model-states file only)."""
    tag = root / "last.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    (root / "last.ckpt" / "latest").write_text("checkpoint")
    torch.save({"module": {}, "global_step": 3, "hyper_parameters": HPARAMS}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return root / "last.ckpt"


def test_deepspeed_folder_needs_trust_pickle_and_the_cli_names_the_setting(tmp_path: Path) -> None:
    folder = _fake_folder(tmp_path)
    with pytest.raises(CheckpointError, match="DeepSpeed checkpoint folder.*trust_pickle=True"):
        load_pretrained(str(folder))
    module = SH2LightningModule(preset="tiny", seq_len=64, init_from=str(folder))
    with pytest.raises(CheckpointError, match="Fix: set model.init_from_trust_pickle: true"):
        module.configure_model()


def test_latest_naming_a_missing_folder_says_so(tmp_path: Path) -> None:
    folder = _fake_folder(tmp_path)
    (folder / "latest").write_text("global_step99")
    with pytest.raises(CheckpointError, match="'latest' file names 'global_step99', which is not a folder"):
        load_pretrained(str(folder), trust_pickle=True)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="the message for a missing deepspeed package")
def test_deepspeed_folder_without_deepspeed_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"pip install 'sh2\[deepspeed\]'"):
        load_pretrained(str(_fake_folder(tmp_path)), trust_pickle=True)


class _Lightningish(torch.nn.Module):
    """What Lightning hands DeepSpeed: a wrapper whose ``_forward_module`` is the LightningModule (``.model``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._forward_module = torch.nn.Module()
        self._forward_module.model = model


def _write_and_read(rank: int, world: int, root: str) -> None:
    import deepspeed

    os.environ["LOCAL_RANK"] = str(rank)
    for stage in (2, 3):
        torch.manual_seed(stage)
        source = SH2Model(SH2Config.from_name("tiny"))
        expected = {k: v.detach().clone() for k, v in source.state_dict().items()}
        engine, *_ = deepspeed.initialize(
            model=_Lightningish(source), optimizer=torch.optim.AdamW(source.parameters(), lr=1e-3),
            config={"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1,
                    "zero_allow_untested_optimizer": True})
        folder = Path(root) / f"zero{stage}" / "last.ckpt"
        engine.save_checkpoint(str(folder), client_state={"global_step": 3, "hyper_parameters": HPARAMS},
                               tag="checkpoint")
        cfg, state = load_pretrained(str(folder), trust_pickle=True)
        assert cfg == SH2Config.from_name("tiny")
        params = {n for n, _ in source.named_parameters()}
        assert params <= set(state), sorted(params - set(state))[:3]
        for name in params:
            assert torch.equal(state[name], expected[name]), (stage, name)
        # and as init_from: exactly these weights in a fresh model
        module = SH2LightningModule(preset="tiny", seq_len=64, init_from=str(folder), init_from_trust_pickle=True)
        module.configure_model()
        for name, p in module.model.named_parameters():
            assert torch.equal(p.detach(), expected[name]), (stage, name)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the deepspeed package (optional extra)")
def test_zero2_and_zero3_folders_load_the_exact_fp32_weights(tmp_path: Path) -> None:
    run_distributed(_write_and_read, 1, str(tmp_path))
