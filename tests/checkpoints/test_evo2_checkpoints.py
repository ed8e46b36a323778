"""Evo 2 checkpoint readers/writer: numerical parity with an independent float64 Vortex forward, round trips,
byte shards, and clear errors for malformed inputs."""

from __future__ import annotations

import pytest
import torch
import yaml
from evo2_reference import random_savanna, random_vortex_state, tiny_vortex_yaml, vortex_forward64

from sh2.checkpoints import (
    CheckpointError,
    infer_config,
    load_into,
    load_pretrained,
    save_vortex,
    sh2_to_vortex,
    vortex_to_sh2,
)
from sh2.models import SH2Config, SH2Model
from sh2.models.config import PRESETS
from sh2.models.filters import DecayedFilter

# fp32 model vs float64 oracle over 8 layers: rounding gives ~3e-6; the contract is 1e-5.
TOL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def write_vortex(tmp_path, seed=0, name="evo2_tiny", with_yaml=True):
    cfg = tiny_vortex_yaml()
    sd = random_vortex_state(cfg, seed)
    path = tmp_path / f"{name}.pt"
    torch.save(sd, path)
    if with_yaml:
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
    return path, cfg, sd


def ids_batch(L=40, B=2, seed=0):
    return torch.randint(0, 512, (B, L), generator=torch.Generator().manual_seed(seed))


def model_from(config, state):
    model = SH2Model(config).eval()
    model.load_state_dict(state)
    return model


def test_vortex_checkpoint_matches_float64_reference(tmp_path):
    path, cfg, sd = write_vortex(tmp_path)
    config, state = load_pretrained(str(path))
    assert config.layout == "SDH*SDH*" and config.mlp_activation == "evo2" and config.rope_scaling == 2.0
    assert config.num_heads == 2 and config.mr_filter_len == 128 and config.se_groups == 4
    ids = ids_batch()
    with torch.no_grad():
        logits = model_from(config, state)(ids)
    assert rel_err(logits, vortex_forward64(cfg, sd, ids)) < TOL


def test_vortex_config_passed_explicitly_and_inferred_without_yaml(tmp_path):
    path, cfg, _ = write_vortex(tmp_path, with_yaml=False)
    config, _ = load_pretrained(str(path), vortex_config=cfg)
    assert config.layout == "SDH*SDH*"
    inferred = infer_config(torch.load(path, weights_only=False))  # shapes only: layout, filters, MLP
    assert (inferred.layout, inferred.mlp_hidden_size, inferred.se_groups, inferred.mr_filter_len) == (
        "SDH*SDH*", 64, 4, 128)


def test_infer_config_takes_non_shape_fields_from_matching_preset(monkeypatch, tmp_path):
    path, _, _ = write_vortex(tmp_path, with_yaml=False)
    fields = dict(hidden_size=32, num_layers=8, num_heads=2, mlp_hidden_size=64, se_groups=4, mr_groups=4,
                  layout="SDH*SDH*", rope_scaling=2.0, mlp_activation="evo2")
    monkeypatch.setitem(PRESETS, "evo2_test", fields)
    config = infer_config(torch.load(path, weights_only=False))
    assert config.name == "evo2_test" and config.num_heads == 2 and config.rope_scaling == 2.0


def test_vortex_byte_shards_are_concatenated_in_order(tmp_path):
    path, _, _ = write_vortex(tmp_path)
    _, whole = load_pretrained(str(path))
    data = path.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
        (tmp_path / f"{path.name}.part{i}").write_bytes(data[cuts[i]:cuts[i + 1]])
    path.unlink()
    for name in (path.name, f"{path.name}.part0"):
        _, state = load_pretrained(str(tmp_path / name))
        assert all(torch.equal(state[k], whole[k]) for k in whole)


def test_missing_and_truncated_shards_are_reported(tmp_path):
    path, _, _ = write_vortex(tmp_path)
    data = path.read_bytes()
    path.unlink()
    half = len(data) // 2
    (tmp_path / f"{path.name}.part0").write_bytes(data[:half])
    (tmp_path / f"{path.name}.part2").write_bytes(data[half:])
    with pytest.raises(CheckpointError, match=r"shard .*\.part1 is missing"):
        load_pretrained(str(path))
    (tmp_path / f"{path.name}.part2").unlink()
    (tmp_path / f"{path.name}.part1").write_bytes(data[half:-100])  # truncated download
    with pytest.raises(CheckpointError, match="truncated or corrupt.*shards"):
        load_pretrained(str(path))


def test_savanna_checkpoint_matches_float64_reference(tmp_path):
    cfg = tiny_vortex_yaml()
    obj, vsd = random_savanna(cfg)
    step = tmp_path / "global_step10"
    step.mkdir()
    torch.save(obj, step / "mp_rank_00_model_states.pt")
    target = SH2Config.from_dict({**load_pretrained_config(cfg).to_dict()})
    config, state = load_pretrained(str(step), config=target)
    mod = obj["module"]
    # Savanna's MR h and LI p/gamma/R are sh2's own parameters: copied exactly.
    assert torch.equal(state["blocks.1.mixer.filter.h"], mod["sequential.3.mixer.mixer.filter.h"][:, :128])
    assert torch.equal(state["blocks.2.mixer.filter.p"], mod["sequential.4.mixer.mixer.filter.p"].view(32, 16))
    ids = ids_batch()
    with torch.no_grad():
        logits = model_from(config, state)(ids)
    assert rel_err(logits, vortex_forward64(cfg, vsd, ids)) < TOL
    inferred, _ = load_pretrained(str(step))  # no config: shapes + defaults, same layout
    assert inferred.layout == "SDH*SDH*" and inferred.mr_groups == 4
    # the run folder above it, whose DeepSpeed 'latest' file names the step folder, reads the same
    (tmp_path / "latest").write_text("global_step10\n")
    _, again = load_pretrained(str(tmp_path), config=target)
    assert torch.equal(again["blocks.1.mixer.filter.h"], state["blocks.1.mixer.filter.h"])


def load_pretrained_config(cfg):
    from sh2.checkpoints import config_from_vortex

    return config_from_vortex(cfg)


def randomized_sh2_model(config, seed=0):
    torch.manual_seed(seed)
    model = SH2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("filter.h", "filter.R", "skip", "bias")):
                p.normal_(0, 0.3)
            elif name.endswith("filter.gamma"):
                p.uniform_(-4, -2)
    return model


def test_roundtrip_sh2_vortex_sh2(tmp_path):
    config = load_pretrained_config(tiny_vortex_yaml())
    model = randomized_sh2_model(config)
    pt, yml = save_vortex(model, config, tmp_path / "export.pt")
    back_config, back = load_pretrained(str(pt))
    assert back_config.to_dict() == {**config.to_dict(), "name": back_config.name}
    orig = model.state_dict()
    assert set(back) == set(orig)
    reparam = ("filter.p", "filter.gamma")
    for key, value in orig.items():
        if key.endswith(reparam) or (key.endswith("filter.h") and config.operators[int(key.split(".")[1])] == "MR"):
            continue
        assert torch.equal(back[key], value), key  # renames, permutations and flips are exact
    # The two filters Vortex stores in folded form agree to fp32 rounding (same effective filter).
    reloaded = model_from(config, back)
    for a, b in zip(model.blocks, reloaded.blocks):
        if a.operator == "MR":
            torch.testing.assert_close(b.mixer.filter.weight(), a.mixer.filter.weight(), rtol=2e-7, atol=0)
        if a.operator == "LI":
            torch.testing.assert_close(b.mixer.filter.log_poles(), a.mixer.filter.log_poles(), rtol=1e-6, atol=0)
    ids = ids_batch()
    with torch.no_grad():
        assert rel_err(reloaded(ids), model(ids).double()) < 1e-6


def test_roundtrip_vortex_sh2_vortex_is_exact_in_bf16():
    cfg = tiny_vortex_yaml()
    vsd = {k: (v.to(torch.bfloat16) if "log_poles" not in k and "residues" not in k else v)
           for k, v in random_vortex_state(cfg, extras=False).items()}
    config = load_pretrained_config(cfg)
    back = sh2_to_vortex(config, vortex_to_sh2(config, vsd).materialize(), dtype=torch.bfloat16)
    assert set(back) == set(vsd)
    for key, value in vsd.items():
        if key.endswith("log_poles"):
            torch.testing.assert_close(back[key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(back[key], value), key


def test_lightning_ckpt_and_plain_state_dict(tmp_path):
    config = SH2Config.from_name("tiny", num_layers=4, layout="SDH*")
    model = randomized_sh2_model(config)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"val_loss.total": torch.ones(1)},
            "hyper_parameters": {"preset": "tiny", "overrides": {"num_layers": 4, "layout": "SDH*"},
                                 "vocab_size": 512}, "pytorch-lightning_version": "2.6.6"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    got_config, state = load_pretrained(str(tmp_path / "last.ckpt"))
    assert got_config == config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    none_config, state = load_pretrained(str(tmp_path / "plain.pt"))
    assert none_config is None and set(state) == set(model.state_dict())
    fresh = SH2Model(config)
    load_into(fresh, str(tmp_path / "last.ckpt"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_load_into_casts_to_the_model_dtype_and_keeps_li_fp32(tmp_path):
    path, _, sd = write_vortex(tmp_path)
    config, _ = load_pretrained(str(path))
    model = SH2Model(config).to(torch.bfloat16)
    for block in model.blocks:
        if block.operator == "LI":
            block.mixer.filter.float()
    load_into(model, str(path))
    assert model.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(model.embedding.weight, sd["embedding_layer.weight"].to(torch.bfloat16))
    assert model.blocks[2].mixer.filter.p.dtype == torch.float32


def test_mismatching_config_names_the_first_key_and_both_shapes(tmp_path):
    path, cfg, _ = write_vortex(tmp_path)
    wrong = load_pretrained_config(cfg).replace(mlp_hidden_size=96)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.w1\.weight'.*mlp\.l1\.weight.*\[64, 32\].*\[96, 32\]"):
        load_pretrained(str(path), config=wrong)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.w1\.weight.*\[64, 32\].*\[96, 32\]"):
        load_into(SH2Model(wrong), str(path))


def test_missing_unexpected_and_unsupported_entries(tmp_path):
    cfg = tiny_vortex_yaml()
    config = load_pretrained_config(cfg)
    sd = random_vortex_state(cfg, extras=False)
    missing = {k: v for k, v in sd.items() if k != "blocks.2.filter.residues"}
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.2\.filter\.residues'"):
        vortex_to_sh2(config, missing)
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.filter\.extra'"):
        vortex_to_sh2(config, {**sd, "blocks.0.filter.extra": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="non-zero"):
        vortex_to_sh2(config, {**sd, "blocks.0.projections.bias": torch.ones(96)})
    vortex_to_sh2(config, {**sd, "blocks.0.projections.bias": torch.zeros(96)})  # zero bias: accepted
    positive = dict(sd)
    positive["blocks.2.filter.log_poles"] = sd["blocks.2.filter.log_poles"].abs()
    with pytest.raises(CheckpointError, match="non-negative"):
        vortex_to_sh2(config, positive).materialize()
    torch.save({"foo": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_pretrained(str(tmp_path / "odd.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(str(tmp_path / "junk.pt"))


def test_fp8_trained_releases_warn(tmp_path, caplog):
    path, cfg, _ = write_vortex(tmp_path, name="evo2_1b_like")
    (tmp_path / "evo2_1b_like.yml").write_text(yaml.safe_dump({**cfg, "model_name": "evo2_1b_base"}))
    with caplog.at_level("WARNING", logger="sh2.checkpoints.vortex_config"):
        load_pretrained(str(path))
    assert "FP8" in caplog.text


def test_sharded_lightning_checkpoint_folder_of_fsdp2_and_cp_runs(tmp_path):
    # The context-parallel strategy (and Lightning's FSDP2) save *.ckpt as a torch.distributed.checkpoint
    # folder; init_from and sh2 predict must read such a folder as one checkpoint.
    import torch.distributed.checkpoint as dcp

    config = SH2Config.from_name("tiny", num_layers=4, layout="SDH*")
    model = randomized_sh2_model(config)
    folder = tmp_path / "last.ckpt"
    weights = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    optimizer = {"state": {k: {"exp_avg": torch.ones_like(v)} for k, v in weights.items()}}
    dcp.save({"state_dict": weights, "optimizer_0": optimizer}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"hyper_parameters": {"preset": "tiny", "overrides": {"num_layers": 4, "layout": "SDH*"},
                                     "vocab_size": 512}, "global_step": 3}, folder / "meta.pt")
    for name in ("data_state_rank0.pt", "data_state_rank1.pt"):
        torch.save({"loops": {}}, folder / name)
    got_config, state = load_pretrained(str(folder))
    assert got_config == config and set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = SH2Model(config)
    load_into(fresh, str(folder))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    (folder / "__0_0.distcp").write_bytes(b"")  # a lost shard is a CheckpointError naming the folder
    with pytest.raises(CheckpointError, match="sharded checkpoint"):
        load_pretrained(str(folder))


def test_vortex_filter_orientation_and_d_term_follow_the_filter_length_not_the_operator():
    # A 128-tap SE filter is causal in Vortex and has a (zero) D term; a 16-tap MR filter is conv1d-oriented and
    # has none, so its skip must be zero to export.
    config = SH2Config(hidden_size=32, num_layers=4, layout="SDH*", num_heads=2, mlp_hidden_size=48, se_groups=4,
                       mr_groups=4, se_filter_len=128, mr_filter_len=16, mr_ref_len=64)
    model = randomized_sh2_model(config)
    with torch.no_grad():
        model.blocks[1].mixer.skip.zero_()
    state = model.state_dict()
    vsd = sh2_to_vortex(config, state)
    assert torch.equal(vsd["blocks.0.filter.h"][:, 0], state["blocks.0.mixer.filter.h"])  # causal: not flipped
    assert torch.equal(vsd["blocks.0.filter.D"], torch.zeros(32))
    assert "blocks.1.filter.D" not in vsd
    decay = DecayedFilter(4, 16, "weak", 64).decay().double()
    torch.testing.assert_close(vsd["blocks.1.filter.h"][:, 0].double(),
                               (state["blocks.1.mixer.filter.h"].double() * decay).float().flip(-1).double())
    back = vortex_to_sh2(config, vsd).materialize()
    for key, value in state.items():
        if key.endswith(("filter.p", "filter.gamma")):
            continue
        if key == "blocks.1.mixer.filter.h":  # decay folded in and out: fp32 rounding
            torch.testing.assert_close(back[key], value, rtol=2e-7, atol=0)
        else:
            assert torch.equal(back[key], value), key
    with torch.no_grad():
        model.blocks[1].mixer.skip.fill_(1.0)
    with pytest.raises(CheckpointError, match="shorter than 128 taps has no D term"):
        sh2_to_vortex(config, model.state_dict())
    vsd["blocks.0.filter.D"] = torch.ones(32)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.filter\.D' is non-zero"):
        vortex_to_sh2(config, vsd)
