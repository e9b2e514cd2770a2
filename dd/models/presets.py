"""What every family's preset spec shares: component entries, ``bundled://`` and ``random:<seed>`` references.

``configs/model/<preset>.yaml`` is the only size table; a family's spec (``LlamaGenSpec``, ``VARSpec``) turns it
into models on demand. ``bundled://<file>`` resolves to weights shipped inside the package (``dd/assets``);
``random:<seed>`` gives seeded random weights (tests and speed benchmarks only).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dd.checkpoint import CONFIG_KEYS, CheckpointError, MissingWeightsError, resolve_reference

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_PREFIX = "bundled://"
RANDOM_PREFIX = "random:"


@contextmanager
def device_scope(device: str | torch.device | None) -> Iterator[None]:
    """Build modules on a device (``"meta"`` allocates nothing: parameter counts of the big presets)."""
    if device is None:
        yield
    else:
        with torch.device(device):
            yield


@dataclass(frozen=True)
class ComponentSpec:
    """Architecture keyword arguments plus where the weights come from."""

    arch: dict[str, Any]
    checkpoint: str | None = None
    checkpoint_key: str | None = None


def component_from_config(entry: dict[str, Any]) -> ComponentSpec:
    return ComponentSpec(dict(entry.get("arch", {})), entry.get("checkpoint"), entry.get("checkpoint_key"))


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights of a sane scale for ``checkpoint: random:<seed>`` (tests and speed benchmarks only):
    every weight matrix N(0, 1/fan_in), so logits are O(1) and every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        elif name.endswith("bias"):
            param.zero_()


def resolve_bundled(reference: str | None) -> str | None:
    """Map ``bundled://name`` to the packaged asset path; other references pass through unchanged."""
    if reference is None or not str(reference).startswith(BUNDLED_PREFIX):
        return reference
    path = ASSETS_DIR / str(reference)[len(BUNDLED_PREFIX):]
    if not path.is_file():
        raise CheckpointError(f"bundled weights {path} are missing from this installation of dd; reinstall dd "
                              f"or train them with the scripts in scripts/ (see README, 'Bundled tiny teachers').")
    return str(path)


Loader = Callable[..., Any]


def with_local_weights(spec: Any, kinds: Iterable[str]) -> Any:
    """A copy of a preset spec whose ``kinds`` components ("tokenizer", "teacher", "student") point at local files.

    Every reference is resolved *before* anything is built (``hf://`` through the Hugging Face cache, ``bundled://``
    to the package assets), so a run that lacks weights fails in about a second, with one message naming every
    missing file and the setting that takes a local path, instead of after building a large model."""
    resolved, missing = {}, []
    for kind in kinds:
        component = getattr(spec, kind)
        reference = component.checkpoint
        if reference is None or str(reference).startswith(RANDOM_PREFIX):
            continue
        try:
            path = resolve_reference(resolve_bundled(str(reference)), CONFIG_KEYS.get(kind))
        except MissingWeightsError as err:
            missing.append(f"{kind} {err.reference} ({err.fix})")
            continue
        resolved[kind] = dataclasses.replace(component, checkpoint=str(path))
    if missing:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = " offline (HF_HUB_OFFLINE is set)" if offline else ""
        raise MissingWeightsError(f"preset {spec.name} needs weights that are not available{where}: "
                                  + "; ".join(missing) + ".", ", ".join(missing), "see above")
    return dataclasses.replace(spec, **resolved)


def spec_from_yaml(path: str | Path) -> Any:
    """A preset spec from a ``configs/model/*.yaml`` file without Hydra: its ``_target_`` (a family's
    ``make_spec``) is imported and called with the remaining entries (scripts and notebooks)."""
    import yaml

    return spec_from_config(yaml.safe_load(Path(path).read_text()))


def spec_from_config(cfg: dict[str, Any]) -> Any:
    """A preset spec from a plain model config (a preset YAML's content, or the ``model`` entry a run or an export
    stored), without Hydra."""
    import importlib

    entries = dict(cfg)
    module, _, name = str(entries.pop("_target_")).rpartition(".")
    return getattr(importlib.import_module(module), name)(**entries)


def load_component(model: torch.nn.Module, component: ComponentSpec, kind: str, preset: str,
                   loader: Loader) -> None:
    """Fill ``model`` from a component's reference: ``random:<seed>``, ``bundled://``, a path or ``hf://``.

    ``loader(model, path, kind=..., key=..., preset=...)`` is the family's strict loader."""
    reference = component.checkpoint
    if reference is not None and str(reference).startswith(RANDOM_PREFIX):
        random_weights(model, int(str(reference)[len(RANDOM_PREFIX):] or 0))
        return
    if reference is None:
        raise CheckpointError(f"preset {preset!r} names no {kind} checkpoint; set model.{kind}.checkpoint")
    loader(model, resolve_bundled(reference), kind=kind, key=component.checkpoint_key, preset=preset)
