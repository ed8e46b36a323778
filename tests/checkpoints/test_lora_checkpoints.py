"""LoRA adapters on disk: a LoRA run's checkpoint reads as merged weights and exports to sh2 safetensors and Vortex
with the adapted model's logits; adapter-only files round-trip and merge into their base; errors name the fix."""

from __future__ import annotations

import pytest
import torch

from sh2.checkpoints import CheckpointError, load_into, load_pretrained, save_safetensors
from sh2.checkpoints.adapters import load_adapters, read_adapters, save_adapters
from sh2.checkpoints.export import export_checkpoint, main
from sh2.models import SH2Config, SH2Model
from sh2.models.lora import LoRAConfig, LoRALinear, apply_lora

IDS = torch.tensor([[65, 67, 71, 84, 84, 65, 71, 67, 65, 65, 84, 71, 67, 65, 0, 71, 67]])
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("in_proj", "qkv", "w2", "mixer.out_proj"))


def base_model(seed: int = 0) -> SH2Model:
    """The tiny preset with non-trivial values everywhere, and zero MR skips (what Vortex can hold)."""
    torch.manual_seed(seed)
    model = SH2Model(SH2Config.from_name("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in model.blocks:
            if block.operator == "MR":
                block.mixer.skip.zero_()
    return model


def adapted_model(seed: int = 0) -> SH2Model:
    model = base_model(seed)
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained adapters: B away from its zero start
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return model


def lightning_checkpoint(model: SH2Model, path, lora: LoRAConfig | None = LORA) -> None:
    """What sh2 fit saves for a LoRA run: base weights and adapters under model.*, the settings as hyper-parameters."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "overrides": None, "vocab_size": 512,
                                     "lora": None if lora is None else lora.to_dict()}}, path)


def test_a_lora_runs_checkpoint_reads_as_merged_weights_and_exports(tmp_path):
    model = adapted_model()
    with torch.no_grad():
        expected = model(IDS)
        assert (expected - base_model()(IDS)).abs().max() > 1e-2  # the adapters change the model
    lightning_checkpoint(model, tmp_path / "last.ckpt")
    config, state = load_pretrained(str(tmp_path / "last.ckpt"))
    assert set(state) == set(base_model().state_dict())
    merged = SH2Model(config).eval()
    merged.load_state_dict(state)
    with torch.no_grad():  # fp32: W x + s B (A x) against (W + s B A) x
        torch.testing.assert_close(merged(IDS), expected, rtol=1e-5, atol=1e-5)
    # a weight no adapter touches is passed through as it was
    assert torch.equal(state["blocks.0.mlp.w1.weight"], model.blocks[0].mlp.w1.weight)

    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "merged.safetensors")]) == 0
    _, exported = load_pretrained(str(tmp_path / "merged.safetensors"))
    assert all(torch.equal(exported[k], state[k]) for k in state)
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "vortex" / "merged.pt"), "--format", "vortex"]) == 0
    back = SH2Model(config).eval()
    load_into(back, str(tmp_path / "vortex" / "merged.pt"))
    with torch.no_grad():  # MR/LI filters round-trip through Vortex to fp32 rounding (see docs/evo2.md)
        torch.testing.assert_close(back(IDS), expected, rtol=1e-5, atol=1e-5)


def test_adapter_file_round_trip_and_merge_into_its_base(tmp_path):
    model = adapted_model()
    path = save_adapters(model, LORA, model.config, tmp_path / "run" / "adapters.safetensors", base="base.pt", step=7)
    assert path == tmp_path / "run" / "adapters.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["adapters.safetensors"]  # no temporary file left
    tensors, lora, config, meta = read_adapters(path)
    assert lora == LORA and config == model.config and (meta["base"], meta["step"]) == ("base.pt", "7")
    adapters = {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
    assert set(tensors) == set(adapters) and all(torch.equal(tensors[k], v) for k, v in adapters.items())

    # into a fresh model with the same LoRA layers: the same model
    fresh = base_model()
    apply_lora(fresh, lora)
    load_adapters(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))

    # merged into the base weights by the export command
    save_safetensors(base_model(), model.config, tmp_path / "base.safetensors")
    assert main([str(tmp_path / "base.safetensors"), str(tmp_path / "full.safetensors"), "--adapters", str(path)]) == 0
    config, state = load_pretrained(str(tmp_path / "full.safetensors"))
    merged = SH2Model(config).eval()
    merged.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_adapter_errors_name_the_fix(tmp_path):
    model = adapted_model()
    path = save_adapters(model, LORA, model.config, tmp_path / "adapters.safetensors")
    with pytest.raises(CheckpointError, match="holds LoRA adapters only, not model weights.*--adapters"):
        load_pretrained(str(path))
    other = base_model()
    apply_lora(other, LoRAConfig(rank=2, targets=LORA.targets))
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'blocks.0.mixer.in_proj.lora_A'.*rank 4"):
        load_adapters(other, path)
    other = base_model()
    apply_lora(other, LoRAConfig(rank=4, targets=("w1",)))
    with pytest.raises(CheckpointError, match=r"do not fit the model's LoRA layers \(missing 'blocks.0.mlp.w1.lora_A'"):
        load_adapters(other, path)
    save_safetensors(base_model(), model.config, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="is not an sh2 LoRA adapter file"):
        read_adapters(tmp_path / "plain.safetensors")
    # adapters in a checkpoint without the settings that scale them
    lightning_checkpoint(model, tmp_path / "nolora.ckpt", lora=None)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters \(blocks.0.mixer.in_proj.lora_A, ...\) but not "
                                              r"their settings"):
        load_pretrained(str(tmp_path / "nolora.ckpt"))
    # an adapter file of another architecture does not fit the base weights
    wide = SH2Model(SH2Config.from_name("tiny", hidden_size=64))
    apply_lora(wide, LORA)
    save_adapters(wide, LORA, wide.config, tmp_path / "wide.safetensors")
    save_safetensors(base_model(), model.config, tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match=r"LoRA adapter shapes \[4, 64\] \(A\) and \[192, 4\] \(B\) do not fit "
                                              r"the weight 'blocks.0.mixer.in_proj.weight' \[384, 128\]"):
        export_checkpoint(str(tmp_path / "base.safetensors"), str(tmp_path / "x.safetensors"),
                          adapters=str(tmp_path / "wide.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
