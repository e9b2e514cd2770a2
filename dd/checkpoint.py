"""Checkpoint I/O for every official and dd layout, in one place.

* ``resolve_reference``: local paths, ``~`` paths and ``hf://<org>/<repo>/<path/in/repo>`` references (resolved
  through huggingface_hub into its cache; offline it fails at once with a message saying how to pass a path).
* ``read_checkpoint``: ``torch.load(map_location="cpu", weights_only=True)``. ``argparse.Namespace`` (the ``args``
  entry of official training checkpoints) is allow-listed; nothing else is unpickled.
* ``extract_state_dict``: unwraps ``{'model': ...}``, ``{'ema': ...}``, ``{'module': ...}``, ``{'state_dict': ...}``,
  ``{'trainer': {'ema_parameters' | 'var_wo_ddp': ...}}`` and raw (FSDP-consolidated) dicts.
* ``load_strict``: ``load_state_dict(strict=True)`` with an error naming missing / unexpected / mis-shaped keys
  and the likely cause.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_PREFIX = "hf://"

#: The wrapper keys tried, in order, for each kind of file when no explicit key is given.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("model", "ema", "state_dict"),
    "teacher": ("model", "ema", "module", "state_dict"),
    "student": ("ema", "model", "module", "state_dict"),
    "var_student": ("trainer.ema_parameters", "trainer.var_wo_ddp", "ema", "model", "state_dict"),
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to the model it was meant for."""


class MissingWeightsError(CheckpointError):
    """A referenced weights file is not available here. ``fix`` says, in one clause, how to provide it."""

    def __init__(self, message: str, reference: str, fix: str) -> None:
        super().__init__(message)
        self.reference, self.fix = reference, fix


#: the config key that overrides each kind of weights file (for hints)
CONFIG_KEYS = {"tokenizer": "model.tokenizer.checkpoint", "teacher": "model.teacher.checkpoint",
               "student": "model.student.checkpoint"}


def _override_hint(filename: str, config_key: str | None) -> str:
    key = config_key or "model.<tokenizer|teacher|student>.checkpoint"
    return f"pass {key}=/path/to/{Path(filename).name}"


def resolve_reference(reference: str | os.PathLike[str], config_key: str | None = None) -> Path:
    """Turn a local path or an ``hf://org/repo/path`` reference into an existing local file path.

    ``config_key`` (e.g. ``model.teacher.checkpoint``) is named in the error as the setting that takes a local file.
    """
    text = str(reference)
    if text.startswith(HF_PREFIX):
        return _download_hf(text, config_key)
    path = Path(text).expanduser()
    if not path.is_file():
        fix = _override_hint(path.name, config_key) + " with an existing file (or an hf://<org>/<repo>/<file> reference)"
        raise MissingWeightsError(f"checkpoint file not found: {path}; {fix}.", text, fix)
    return path


def _download_hf(reference: str, config_key: str | None = None) -> Path:
    parts = reference[len(HF_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"malformed reference {reference!r}: expected hf://<org>/<repo>/<path/in/repo>")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:  # huggingface_hub raises several classes for offline / missing files
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache. " if offline else "")
        fix = (f"download it where there is network access (huggingface-cli download {repo_id} {filename}) and "
               + _override_hint(filename, config_key))
        raise MissingWeightsError(f"could not fetch {reference} ({type(err).__name__}: {err}). {hint}To use it, "
                                  f"{fix}.", reference, fix) from err


def read_checkpoint(reference: str | os.PathLike[str], config_key: str | None = None) -> Any:
    """Load a checkpoint object safely (CPU, weights_only=True)."""
    path = resolve_reference(reference, config_key)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read {path} as a torch checkpoint ({type(err).__name__}: {err}). "
                              f"The file may be truncated, corrupt or not a PyTorch weights file.") from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def extract_state_dict(obj: Any, kind: str = "teacher", key: str | None = None) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint.

    ``key`` (dotted, e.g. ``"ema"`` or ``"trainer.ema_parameters"``) selects an entry explicitly; otherwise the
    ``DEFAULT_KEYS[kind]`` are tried in order and a raw state dict is accepted as is. Prefixes added by
    ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) are stripped; a stray ``freqs_cis`` is dropped.
    """
    candidates = (key,) if key else DEFAULT_KEYS.get(kind, DEFAULT_KEYS["teacher"])
    for candidate in candidates:
        found = _lookup(obj, candidate)
        if _is_state_dict(found):
            return _clean(found)
    if key is None and _is_state_dict(obj):
        return _clean(obj)
    available = sorted(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
    wanted = f"key {key!r}" if key else f"any of {list(candidates)} or a raw state dict"
    raise CheckpointError(f"no state dict found under {wanted}; top-level entries: {available}. "
                          + _other_layout_hint(obj, kind) +
                          "Choose the entry with the checkpoint key option (e.g. checkpoint_key=model).")


def _other_layout_hint(obj: Any, kind: str) -> str:
    """Name the kind of file this is when its layout belongs to another kind (e.g. a VAR-DD student file,
    ``{'trainer': {'ema_parameters': ...}}``, given where a teacher is expected)."""
    for other, keys in DEFAULT_KEYS.items():
        if other == kind:
            continue
        found = next((k for k in keys if _is_state_dict(_lookup(obj, k))), None)
        if found is not None and "." in found:
            return (f"The file holds weights under {found!r}, the layout of a DD student file: load it as a "
                    f"student, not as a {kind}. ")
    return ""


def _clean(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for prefix in ("_orig_mod.", "module."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name == "freqs_cis":
            continue
        out[name] = tensor
    return out


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, preset: str | None = None) -> None:
    """``module.load_state_dict(state, strict=True)`` with a diagnosis instead of PyTorch's raw message."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(what, preset, missing, unexpected, mismatched, expected, state))
    module.load_state_dict(state, strict=True)


def load_entries(module: nn.Module, entries: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Replace some entries of ``module``'s state dict and keep the others: a strict load of the merged state, so an
    entry the module does not have, or one of another shape, is refused (:func:`load_strict`) instead of skipped."""
    load_strict(module, {**module.state_dict(), **entries}, what=what)


def _mismatch_message(what: str, preset: str | None, missing: list[str], unexpected: list[str],
                      mismatched: list[str], expected: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> str:
    lines = [f"checkpoint does not match the {what}" + (f" built from preset {preset!r}" if preset else "") + ":"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{k} file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:5]]
        lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(shapes))
    lines.append("  likely cause: " + _likely_cause(missing, unexpected, mismatched))
    return "\n".join(lines)


def _likely_cause(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    keys = set(missing) | set(unexpected)
    if {"n_d_embed.weight", "final_layer_conti.linear.weight"} & set(unexpected):
        return "this is a DD student checkpoint; load it as a student, not a teacher."
    if {"n_d_embed.weight", "final_layer_conti.linear.weight"} & set(missing):
        return "this is a teacher (or tokenizer) checkpoint; load it as a teacher, or initialise a student from it."
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in keys):
        return "a tokenizer file was given where a transformer was expected, or the other way round."
    if mismatched and not missing and not unexpected:
        return "right kind of file, wrong size: pick the preset that matches the file (e.g. gpt_b vs gpt_l)."
    return ("wrong preset (different depth: layer keys differ) or wrong kind of file; check the model preset and "
            "the checkpoint key (e.g. 'ema' vs 'model').")


def _nest(payload: dict[str, Any], dotted: str, value: Any) -> None:
    """payload[a][b] = value for dotted = "a.b" (the VAR-DD layout ``trainer.ema_parameters``)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        payload = payload.setdefault(part, {})
    payload[leaf] = value


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, wrapper: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{wrapper: state, **extra}`` (or the raw state when wrapper is None) atomically. Dotted wrapper and
    extra keys nest: ``wrapper="trainer.ema_parameters"`` writes ``{'trainer': {'ema_parameters': state}}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: Any = dict(state)
    if wrapper is not None:
        payload = {}
        for key, value in {wrapper: dict(state), **(extra or {})}.items():
            _nest(payload, key, value)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Checksum of a model's weights (names, dtypes, shapes and bytes, in key order): a model's identity,
    independent of the file layout it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
