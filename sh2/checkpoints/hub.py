"""Weights by name: a Hugging Face repo id as ``model.init_from``, resolved through ``huggingface_hub``.

Accepted forms: ``ORG/NAME``, ``ORG/NAME:FILE`` (one checkpoint file of the repo), ``ORG/NAME@REVISION``
(a branch, tag or commit), and the same with an ``hf://`` prefix, which is never mistaken for a local path.
Without the prefix a string is a repo id only when no such local file or folder exists, it has exactly one
``/``, and its last part does not end like a checkpoint file (``.pt``, ``.ckpt``...): so a mistyped local
path still gets a "does not exist" error.

Resolution (:func:`resolve_hub_checkpoint`):

1. The repo's files are listed (on the Hub, or from the cached snapshot when ``HF_HUB_OFFLINE=1`` or the Hub
   cannot be reached) and the checkpoint is chosen: an sh2 safetensors export (``model.safetensors`` +
   ``config.json``), else the one ``.pt``/``.ckpt``/``.safetensors`` file, counting byte shards
   ``NAME.pt.part0..N`` as one file; several candidates need ``ORG/NAME:FILE``.
2. The checkpoint and the repo's config files (``*.yml``, ``*.yaml``, ``config.json``) are fetched with
   ``hf_hub_download`` into the Hugging Face cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``), or only
   looked up there when offline.
3. Byte shards are joined once by :func:`sh2.checkpoints.files.assemble_shards` into
   ``$HF_HOME/sh2/assembled/ORG--NAME/COMMIT/NAME.pt`` (the cache's snapshot folders stay as the Hub wrote
   them).
4. The config: an evo2 YAML in the repo (the names :func:`sh2.checkpoints.vortex.find_vortex_yaml` looks
   for), else a ``config.json`` with Vortex fields, else the sh2 preset of a released Evo 2 model (by repo
   name, as the evo2 package maps them), else the shapes (see :func:`sh2.checkpoints.vortex_config.infer_config`).

Without network and without the files in the cache, the error names the cache folder and the ``hf download``
command that fills it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sh2.checkpoints.files import CheckpointError, assemble_shards

log = logging.getLogger(__name__)

__all__ = ["HubCheckpoint", "HubRef", "parse_hub_id", "resolve_hub_checkpoint", "hub_cache_dir"]

_PREFIX = "hf://"
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<rev>[\w./-]+?))?(:(?P<file>[^:@]+))?$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".yml", ".yaml", ".json")
_WEIGHTS = re.compile(r"^(?P<base>[^/]+\.(pt|pth|ckpt|safetensors))(\.part\d+)?$")
# Released Evo 2 repos -> the sh2 preset of their evo2-package config (evo2/utils.py CONFIG_MAP).
EVO2_RELEASES = {"evo2_7b": "evo2_7b_1m", "evo2_40b": "evo2_40b_1m", "evo2_7b_base": "evo2_7b_8k",
                 "evo2_40b_base": "evo2_40b_8k", "evo2_1b_base": "evo2_1b_8k"}


@dataclass(frozen=True)
class HubRef:
    """A parsed repo id: ``repo_id`` (``ORG/NAME``), an optional ``filename`` and ``revision``."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def download_command(self) -> str:
        """The ``hf download`` command that puts this repo (or file, with its shards) in the cache."""
        cmd = f"hf download {self.repo_id}"
        if self.filename:
            cmd += f" --include '{self.filename}*'"
        if self.revision:
            cmd += f" --revision {self.revision}"
        return cmd


@dataclass(frozen=True)
class HubCheckpoint:
    """Local files for a repo id: the checkpoint ``path`` to read and its ``vortex_config`` (a YAML path or a
    Vortex config dict; None when the checkpoint carries its own config or none was found)."""

    ref: HubRef
    path: Path
    vortex_config: Path | Mapping[str, Any] | None = None


def parse_hub_id(spec: str | os.PathLike) -> HubRef | None:
    """The repo id in ``spec``, or None when ``spec`` is (or looks like) a local path."""
    if not isinstance(spec, str):
        return None
    explicit = spec.startswith(_PREFIX)
    text = spec[len(_PREFIX):] if explicit else spec
    if not explicit and (os.path.exists(spec) or spec.startswith((".", "/", "~"))):
        return None
    m = _REPO_ID.match(text)
    if m is None:
        if explicit:
            raise CheckpointError(f"{spec!r} is not a Hugging Face repo id: expected hf://ORG/NAME[@REVISION][:FILE]")
        return None
    if not explicit and m.group("repo").lower().endswith(_CHECKPOINT_SUFFIXES) and not m.group("file"):
        return None  # "weights/model.pt": a local path that does not exist, not a repo
    return HubRef(m.group("repo"), m.group("file"), m.group("rev"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_home() -> Path:
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME")
    return Path(home).expanduser() if home else Path(constants.HF_HOME)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else huggingface_hub's default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _not_available(ref: HubRef, cache: Path, why: str) -> CheckpointError:
    name = ref.repo_id + (f":{ref.filename}" if ref.filename else "")
    return CheckpointError(
        f"Hugging Face repo {name} is not in the cache {cache} and {why}; no local file or folder {ref.repo_id!r} "
        f"exists either. Fill the cache where there is network, with the same HF_HOME (or HF_HUB_CACHE): "
        f"`{ref.download_command()}` (older huggingface_hub: `huggingface-cli download {ref.repo_id}`), or "
        f"download the files and set model.init_from to the local checkpoint")


def _list_files(ref: HubRef, cache: Path, offline: bool) -> tuple[list[str], str | None]:
    """The repo's files, and None when they come from the Hub or else why the cached snapshot was used."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    reason = "downloads are off (HF_HUB_OFFLINE=1)"
    if not offline:
        try:
            return HfApi().list_repo_files(ref.repo_id, revision=ref.revision), None
        except GatedRepoError:
            raise CheckpointError(f"Hugging Face repo {ref.repo_id} is gated: accept its terms on "
                                  f"https://huggingface.co/{ref.repo_id} and log in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"Hugging Face repo {ref.repo_id} does not exist (or is private: log in with "
                                  f"`hf auth login`), and no local file or folder of that name exists") from None
        except Exception as err:  # no connection, proxy, timeout, Hub down: try the cache
            reason = f"the Hub cannot be reached ({type(err).__name__})"
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise _not_available(ref, cache, reason) from None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return files, reason


def _choose(ref: HubRef, files: list[str]) -> tuple[str, list[str]]:
    """``(checkpoint name, files to fetch for it)`` among the repo's files."""
    if ref.filename:
        if ref.filename in files:
            return ref.filename, [ref.filename]
        parts = sorted((f for f in files if f.startswith(ref.filename + ".part")),
                       key=lambda f: int(f.rsplit("part", 1)[1]) if f.rsplit("part", 1)[1].isdigit() else -1)
        if parts:
            return ref.filename, parts
        raise CheckpointError(f"Hugging Face repo {ref.repo_id} has no file {ref.filename!r} (files: "
                              f"{files[:12]}); fix the name after ':'")
    if "model.safetensors" in files or "model.safetensors.index.json" in files:  # an sh2 / HF-style folder
        wanted = [f for f in files if f.endswith(".safetensors") or f in ("model.safetensors.index.json",
                                                                          "config.json")]
        return "", wanted
    groups: dict[str, list[str]] = {}
    for f in files:
        m = _WEIGHTS.match(f)
        if m:
            groups.setdefault(m.group("base"), []).append(f)
    if len(groups) != 1:
        what = "several checkpoint files" if groups else "no checkpoint file"
        raise CheckpointError(f"Hugging Face repo {ref.repo_id}: {what} ({sorted(groups) or files[:12]}); name "
                              f"the one to load as {ref.repo_id}:FILE")
    base, parts = next(iter(groups.items()))
    if base in parts:
        return base, [base]
    return base, sorted(parts, key=lambda f: int(f.rsplit("part", 1)[1]))


def _fetch(ref: HubRef, name: str, cache: Path, cached_only: str | None) -> Path:
    """``name`` of the repo from the cache, downloading it unless ``cached_only`` (the reason) is set."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(ref.repo_id, name, revision=ref.revision, cache_dir=cache,
                                    local_files_only=cached_only is not None))
    except LocalEntryNotFoundError:
        raise _not_available(HubRef(ref.repo_id, ref.filename or name, ref.revision), cache,
                             cached_only or "the download failed") from None
    except EntryNotFoundError:
        raise CheckpointError(f"Hugging Face repo {ref.repo_id} has no file {name!r}") from None


def _join_shards(ref: HubRef, shards: list[Path], base: str) -> Path:
    import filelock

    commit = shards[0].parent.name
    out_dir = _hf_home() / "sh2" / "assembled" / ref.repo_id.replace("/", "--") / commit
    out_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out_dir / f"{base}.lock")):  # every rank of a job may get here at once
        return assemble_shards(shards[0].parent / base, out_dir=out_dir)


def _config_for(ref: HubRef, folder: Path, checkpoint: Path) -> Path | Mapping[str, Any] | None:
    from sh2.checkpoints.vortex import find_vortex_yaml
    from sh2.checkpoints.vortex_config import vortex_from_config
    from sh2.models.config import SH2Config

    yaml_file = find_vortex_yaml(folder / checkpoint.name)
    if yaml_file is not None:
        return yaml_file
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            values = json.loads(cfg.read_text())
        except ValueError:
            values = None
        if isinstance(values, dict) and "hidden_size" in values and any(k.endswith("_layer_idxs") for k in values):
            return values
    preset = EVO2_RELEASES.get(ref.repo_id.split("/")[1].lower())
    if preset is not None:
        log.info("%s: using the sh2 preset %s (the evo2 package's config for this release)", ref.repo_id, preset)
        return vortex_from_config(SH2Config.from_name(preset))
    return None


def resolve_hub_checkpoint(spec: str | os.PathLike) -> HubCheckpoint | None:
    """Local files for ``spec`` when it is a Hugging Face repo id (None for a local path); see the module
    docstring for the steps.

    Raises:
        CheckpointError: repo or file not found, gated repo, several checkpoint files, or files neither in the
            cache nor downloadable (the message names the cache and the ``hf download`` command).
    """
    ref = parse_hub_id(spec)
    if ref is None:
        return None
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{spec!r} looks like a Hugging Face repo id, which needs the huggingface_hub "
                              f"package: pip install huggingface_hub") from None
    cache = hub_cache_dir()
    files, cached_only = _list_files(ref, cache, _offline())
    name, wanted = _choose(ref, files)
    configs = [f for f in files if "/" not in f and (f.endswith((".yml", ".yaml")) or f == "config.json")]
    local = [_fetch(ref, f, cache, cached_only) for f in wanted]
    snapshot = local[0].parent
    for f in configs:
        if f not in wanted:
            snapshot = _fetch(ref, f, cache, cached_only).parent
    if not name:  # an sh2 / HF-style safetensors folder: read as a folder (weights + config.json)
        return HubCheckpoint(ref, snapshot)
    path = local[0] if local[0].name == name else _join_shards(ref, local, name)
    if path.suffix in (".safetensors", ".ckpt"):
        return HubCheckpoint(ref, path)  # sh2 formats carry their config
    return HubCheckpoint(ref, path, _config_for(ref, snapshot, path))
