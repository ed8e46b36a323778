"""sh2 weights as safetensors: export (file or folder), read back by load_pretrained / init_from with the same
state dict and logits, the export command for every source format, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sh2.checkpoints import CheckpointError, load_into, load_pretrained, save_vortex
from sh2.checkpoints.export import export_checkpoint, main
from sh2.checkpoints.safetensors_file import read_safetensors, save_safetensors
from sh2.models import SH2Config, SH2Model
from sh2.training.module import SH2LightningModule

IDS = torch.tensor([[65, 67, 71, 84, 84, 65, 71, 67, 65, 65, 84, 71, 67, 65]])


def tiny_model(seed: int = 0, **overrides) -> SH2Model:
    torch.manual_seed(seed)
    model = SH2Model(SH2Config.from_name("tiny", **overrides)).eval()
    with torch.no_grad():  # non-trivial values everywhere (init leaves some filters and biases near zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def vortex_compatible(model: SH2Model) -> SH2Model:
    """Zero the skip of MR filters shorter than 128 taps, which the Vortex format cannot hold."""
    with torch.no_grad():
        for block in model.blocks:
            if block.operator == "MR":
                block.mixer.skip.zero_()
    return model


def assert_same_model(state: dict, model: SH2Model, config: SH2Config) -> None:
    ref = model.state_dict()
    assert set(state) == set(ref)
    for key in ref:
        assert state[key].dtype == ref[key].dtype and torch.equal(state[key], ref[key]), key
    loaded = SH2Model(config).eval()
    loaded.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))  # same weights, same code: bit-identical logits


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_export_reads_back_identical_weights_config_and_logits(tmp_path, layout):
    model = tiny_model(tie_embeddings=False)
    out = tmp_path / ("tiny.safetensors" if layout == "file" else "tiny")
    written = save_safetensors(model, model.config, out)
    assert written == (out if layout == "file" else out / "model.safetensors")
    if layout == "folder":
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.pop("model_type") == "sh2" and cfg == model.config.to_dict()
    config, state = load_pretrained(str(out))
    assert config == model.config
    assert_same_model(state, model, config)


def test_safetensors_file_is_plain_safetensors_with_the_config_in_its_metadata(tmp_path):
    from safetensors import safe_open

    model = tiny_model()
    save_safetensors(model, model.config, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert SH2Config.from_dict(json.loads(f.metadata()["sh2_config"])) == model.config
        assert set(f.keys()) == set(model.state_dict())
    assert read_safetensors(tmp_path / "m.safetensors")["config"] == model.config.to_dict()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not the writer's rw-------


def test_bfloat16_export_keeps_the_li_filters_in_float32(tmp_path):
    model = tiny_model()
    save_safetensors(model, model.config, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    _, state = load_pretrained(str(tmp_path / "bf16.safetensors"))
    for key, value in model.state_dict().items():
        li = key.endswith(("filter.p", "filter.gamma", "filter.R"))
        assert state[key].dtype == (torch.float32 if li else torch.bfloat16), key
        assert torch.equal(state[key], value if li else value.bfloat16()), key


def test_init_from_a_safetensors_export(tmp_path):
    model = tiny_model(seed=3)
    save_safetensors(model, model.config, tmp_path / "w.safetensors")
    module = SH2LightningModule(preset="tiny", init_from=str(tmp_path / "w.safetensors"))
    module.configure_model()
    assert_same_model(module.model.state_dict(), model, model.config)


def test_export_command_from_a_lightning_checkpoint_and_to_vortex(tmp_path):
    model = vortex_compatible(tiny_model(seed=1))
    ckpt = tmp_path / "last.ckpt"  # what sh2 fit saves: weights under model.*, the config as hyper-parameters
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "overrides": None, "vocab_size": 512}}, ckpt)
    assert main([str(ckpt), str(tmp_path / "out" / "tiny.safetensors")]) == 0
    config, state = load_pretrained(str(tmp_path / "out" / "tiny.safetensors"))
    assert_same_model(state, model, config)

    assert main([str(ckpt), str(tmp_path / "vortex" / "tiny.pt"), "--format", "vortex"]) == 0
    assert (tmp_path / "vortex" / "tiny.yml").is_file()
    back = SH2Model(config).eval()
    load_into(back, str(tmp_path / "vortex" / "tiny.pt"))
    with torch.no_grad():  # MR/LI filters round-trip through Vortex to fp32 rounding (see docs/evo2.md)
        torch.testing.assert_close(back(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_export_of_a_vortex_file_reads_back_like_the_vortex_file(tmp_path):
    model = vortex_compatible(tiny_model(seed=2))
    save_vortex(model, model.config, tmp_path / "v.pt")
    paths = export_checkpoint(str(tmp_path / "v.pt"), str(tmp_path / "v_sh2"))
    assert [p.name for p in paths] == ["model.safetensors", "config.json"]
    config_v, state_v = load_pretrained(str(tmp_path / "v.pt"))
    config_s, state_s = load_pretrained(str(tmp_path / "v_sh2"))
    assert config_s == config_v and all(torch.equal(state_s[k], state_v[k]) for k in state_v)


def test_export_errors_name_the_fix(tmp_path, capsys):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # no config in the file
    with pytest.raises(CheckpointError, match=r"holds weights without a config; pass --preset NAME"):
        export_checkpoint(str(tmp_path / "bare.pt"), str(tmp_path / "x.safetensors"))
    assert export_checkpoint(str(tmp_path / "bare.pt"), str(tmp_path / "x.safetensors"), preset="tiny")
    with pytest.raises(CheckpointError, match=r"a Vortex export is a \.pt file"):
        export_checkpoint(str(tmp_path / "bare.pt"), str(tmp_path / "x.safetensors"), fmt="vortex", preset="tiny")
    assert main([str(tmp_path / "missing.ckpt"), str(tmp_path / "y.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*broken\.safetensors as safetensors"):
        load_pretrained(str(tmp_path / "broken.safetensors"))


@pytest.mark.slow
def test_export_module_runs_as_a_command(tmp_path):
    model = tiny_model()
    save_safetensors(model, model.config, tmp_path / "a.safetensors")
    res = subprocess.run([sys.executable, "-m", "sh2.checkpoints.export", str(tmp_path / "a.safetensors"),
                          str(tmp_path / "b"), "--dtype", "float16"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[sh2] exported" in res.stdout and (tmp_path / "b" / "model.safetensors").is_file()
