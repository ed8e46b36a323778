"""model.init_from as a Hugging Face repo id, offline, against a cache laid out as huggingface_hub lays it out:
HF_HOME/hub/models--ORG--NAME/{blobs/SHA256, snapshots/COMMIT/FILE -> ../../blobs/SHA256, refs/main}."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from evo2_reference import random_vortex_state, tiny_vortex_yaml

from sh2.checkpoints import CheckpointError, load_pretrained
from sh2.checkpoints import hub as hub_module
from sh2.checkpoints.hub import HubRef, parse_hub_id, resolve_hub_checkpoint
from sh2.checkpoints.safetensors_file import save_safetensors
from sh2.models import SH2Config, SH2Model
from sh2.training.module import SH2LightningModule

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Put ``files`` in the hub cache under ``hf_home`` exactly as ``hf download`` leaves them."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, like huggingface_hub
    return snapshot


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def vortex_files(seed: int = 0) -> tuple[dict, dict[str, torch.Tensor], bytes]:
    cfg = tiny_vortex_yaml()
    state = random_vortex_state(cfg, seed=seed)
    buf = io.BytesIO()
    torch.save(state, buf)
    return cfg, state, buf.getvalue()


def test_repo_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("arcinstitute/evo2_7b") == HubRef("arcinstitute/evo2_7b")
    assert parse_hub_id("org/name@v1.0:weights/evo2.pt") == HubRef("org/name", "weights/evo2.pt", "v1.0")
    assert parse_hub_id("hf://org/name.pt") == HubRef("org/name.pt")  # the prefix always means the Hub
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last").write_text("x")
    assert parse_hub_id("runs/last") is None  # an existing local path wins
    for local in ("weights/evo2_7b.pt", "runs/x/last.ckpt", "./org/name", "/abs/name", "a.ckpt", "org/a/b"):
        assert parse_hub_id(local) is None, local
    with pytest.raises(CheckpointError, match=r"not a Hugging Face repo id: expected hf://ORG/NAME"):
        parse_hub_id("hf://just-a-name")


def test_sharded_vortex_repo_loads_like_its_local_files(tmp_path, offline_home):
    cfg, _, blob = vortex_files()
    third = len(blob) // 3 + 1
    shards = {f"evo2_tiny.pt.part{i}": blob[i * third:(i + 1) * third] for i in range(3)}
    snapshot = cache_repo(offline_home, "org/evo2_tiny", {**shards, "evo2_tiny.yml": yaml.safe_dump(cfg).encode()})
    before = sorted(p.name for p in snapshot.iterdir())

    config, state = load_pretrained("org/evo2_tiny")

    local = tmp_path / "local"
    local.mkdir()
    (local / "evo2_tiny.pt").write_bytes(blob)
    (local / "evo2_tiny.yml").write_text(yaml.safe_dump(cfg))
    config_ref, state_ref = load_pretrained(str(local / "evo2_tiny.pt"))
    assert config == config_ref and set(state) == set(state_ref)
    assert all(torch.equal(state[k], state_ref[k]) for k in state_ref)
    assert sorted(p.name for p in snapshot.iterdir()) == before  # the cache's snapshot is left as it was
    joined = offline_home / "sh2" / "assembled" / "org--evo2_tiny" / COMMIT / "evo2_tiny.pt"
    assert joined.read_bytes() == blob


def test_sh2_safetensors_repo_and_init_from(offline_home):
    torch.manual_seed(0)
    model = SH2Model(SH2Config.from_name("tiny"))
    export = offline_home.parent / "export"
    save_safetensors(model, model.config, export)
    cache_repo(offline_home, "me/sh2-tiny", {p.name: p.read_bytes() for p in export.iterdir()})
    config, state = load_pretrained("hf://me/sh2-tiny")
    assert config == model.config and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    module = SH2LightningModule(preset="tiny", init_from="me/sh2-tiny")
    module.configure_model()
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_file_of_a_repo_with_several_checkpoints(offline_home):
    cfg, _, blob_a = vortex_files(seed=1)
    _, _, blob_b = vortex_files(seed=2)
    cache_repo(offline_home, "org/two", {"a.pt": blob_a, "b.pt": blob_b, "config.yml": yaml.safe_dump(cfg).encode()})
    with pytest.raises(CheckpointError, match=r"org/two: several checkpoint files \(\['a\.pt', 'b\.pt'\]\); name "
                                              r"the one to load as org/two:FILE"):
        load_pretrained("org/two")
    _, state_b = load_pretrained("org/two:b.pt")
    _, state_a = load_pretrained("org/two:a.pt")
    assert not torch.equal(state_a["embedding.weight"], state_b["embedding.weight"])
    with pytest.raises(CheckpointError, match=r"org/two has no file 'c\.pt'"):
        load_pretrained("org/two:c.pt")


def test_missing_repo_offline_names_the_cache_and_the_download_command(offline_home):
    with pytest.raises(CheckpointError) as err:
        load_pretrained("arcinstitute/evo2_7b")
    msg = str(err.value)
    assert str(offline_home / "hub") in msg and "HF_HUB_OFFLINE=1" in msg
    assert "`hf download arcinstitute/evo2_7b`" in msg and "huggingface-cli download arcinstitute/evo2_7b" in msg
    module = SH2LightningModule(preset="tiny", init_from="arcinstitute/evo2_7b")
    with pytest.raises(CheckpointError, match=r"model\.init_from='arcinstitute/evo2_7b': Hugging Face repo"):
        module.configure_model()


def test_unreachable_hub_falls_back_to_the_cache(offline_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_module, "_offline", lambda: False)

    def no_network(self, *args, **kwargs):
        raise ConnectionError("no route to host")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    cfg, _, blob = vortex_files()
    cache_repo(offline_home, "org/evo2_tiny", {"evo2_tiny.pt": blob, "evo2_tiny.yml": yaml.safe_dump(cfg).encode()})
    found = resolve_hub_checkpoint("org/evo2_tiny")
    assert found.path.name == "evo2_tiny.pt" and found.vortex_config.name == "evo2_tiny.yml"
    with pytest.raises(CheckpointError, match=r"the Hub cannot be reached \(ConnectionError\)"):
        resolve_hub_checkpoint("org/other")


def test_released_evo2_repo_without_yaml_gets_its_preset(offline_home):
    from sh2.checkpoints.vortex_config import config_from_vortex

    snapshot = cache_repo(offline_home, "arcinstitute/evo2_1b_base", {"config.json": b'{"architectures": []}'})
    cfg = hub_module._config_for(HubRef("arcinstitute/evo2_1b_base"), snapshot, snapshot / "evo2_1b_base.pt")
    assert config_from_vortex(cfg) == SH2Config.from_name("evo2_1b_8k")
    vortex_json = dict(tiny_vortex_yaml(), model_name="from_json")
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").write_text(json.dumps(vortex_json))
    cfg = hub_module._config_for(HubRef("org/x"), snapshot, snapshot / "x.pt")
    assert cfg == vortex_json  # a config.json with Vortex fields is the config
