"""Sharing a trained DD student on the Hugging Face Hub: a local folder, its model card, and the upload.

The folder (kept after the upload; ``hf://<repo_id>/<file>`` references resolve to its files once uploaded)::

    student_ema.pt         the export of ``python -m dd.train``, byte for byte (the preset family's official DD layout)
    student_ema.pt.json    its config: model preset, schedule, training steps and metrics, teacher checksum
    README.md              the model card: teacher and checksums, schedule, results, commands, licence
    evals/<name>/          metrics.json, config.json and grid.png of every evaluation the card reports
    dd_push.json           what was assembled: repo id, files and their sha256

Evaluations are checked against the export before anything is written: a student evaluation must have scored this
very file (``metrics.json`` records its sha256) and every evaluation must have used the export's teacher, so the
card never reports another model's numbers. No Lightning or Hydra here; ``huggingface_hub`` is imported on upload.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dd.checkpoint import HF_PREFIX, file_sha256
from dd.models.presets import spec_from_config

STUDENT_FILE = "student_ema.pt"
CONFIG_FILE = STUDENT_FILE + ".json"
CARD_FILE = "README.md"
MANIFEST_FILE = "dd_push.json"
EVALS_DIR = "evals"
EVAL_FILES = ("metrics.json", "config.json", "grid.png")
AUTH_HINT = ("log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN to a "
             "write token from https://huggingface.co/settings/tokens")
_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class HubError(ValueError):
    """An export, evaluation folder or Hub request that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Export:
    """A training export: the weights file, its config (``student_ema.pt.json``) and the file's sha256."""

    path: Path
    config: dict[str, Any]
    sha256: str


@dataclass(frozen=True)
class EvalResult:
    """One evaluation folder: ``name`` (its folder under evals/), ``metrics`` (metrics.json), ``config``
    (the resolved config.json of the run)."""

    name: str
    directory: Path
    metrics: dict[str, Any]
    config: dict[str, Any]


# -- inputs ----------------------------------------------------------------------------------------------------
def read_export(path: str | os.PathLike[str]) -> Export:
    """The export at ``path`` with its config; refuses files ``dd.train`` did not write."""
    path = Path(path).expanduser()
    config_path = Path(str(path) + ".json")
    if not path.is_file():
        raise HubError(f"no exported student at {path}: train one with `python -m dd.train` (it writes "
                       f"outputs/train/<run>/export/{STUDENT_FILE}) or pass student=<path to {STUDENT_FILE}>")
    if not config_path.is_file():
        raise HubError(f"{config_path} is missing: dd.train writes it next to every export, and the model card is "
                       f"built from it; push a file exported by dd.train")
    config = json.loads(config_path.read_text())
    if not isinstance(config.get("model"), Mapping) or "_target_" not in config["model"]:
        raise HubError(f"{config_path} names no model preset config (model._target_); push a dd.train export")
    return Export(path, config, file_sha256(path))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HubError(f"{path} is missing: pass folders written by `python -m dd.eval` (metrics.json, config.json)")
    return json.loads(path.read_text())


def read_eval(directory: str | os.PathLike[str], export: Export, name: str | None = None) -> EvalResult:
    """An evaluation folder, checked against ``export``: a student run must have scored this file, and any run that
    used a teacher must have used the export's (state-dict checksums)."""
    directory = Path(directory).expanduser()
    metrics, config = _read_json(directory / "metrics.json"), _read_json(directory / "config.json")
    sums = metrics.get("checksums", {})
    student_sha = sums.get("student", {}).get("file_sha256")
    if "student" in sums and student_sha != export.sha256:
        raise HubError(f"{directory} evaluated another student file (sha256 {str(student_sha)[:12]}..., the export "
                       f"{export.path} is {export.sha256[:12]}...): evaluate the export with `python -m dd.eval "
                       f"student.checkpoint={export.path}` or leave that folder out of evals")
    teacher_sha = sums.get("teacher", {}).get("state_dict_sha256")
    if teacher_sha is not None and teacher_sha != export.config.get("teacher_sha256"):
        raise HubError(f"{directory} used another teacher (state_dict sha256 {teacher_sha[:12]}...) than the one the "
                       f"student was distilled from ({str(export.config.get('teacher_sha256'))[:12]}...); leave that "
                       f"folder out of evals")
    return EvalResult(name or directory.name, directory, metrics, config)


def _unique_names(directories: Sequence[Path]) -> list[str]:
    """Folder names for evals/, made unique with a counter where two runs share a name."""
    names: list[str] = []
    for directory in directories:
        base, name, count = directory.name or "eval", directory.name or "eval", 1
        while name in names:
            count += 1
            name = f"{base}_{count}"
        names.append(name)
    return names


def read_evals(directories: Sequence[str | os.PathLike[str]], export: Export) -> list[EvalResult]:
    paths = [Path(d).expanduser() for d in directories]
    return [read_eval(path, export, name) for path, name in zip(paths, _unique_names(paths))]


# -- the model card ------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _override_value(value: Any) -> str:
    """A Hydra command-line value: lists without spaces, strings as they are."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _preset_overrides(config: Mapping[str, Any]) -> list[str]:
    """``model.sampling.*`` and ``hardware=`` overrides that turn the preset's defaults into the run's settings
    (best effort: needs the repository's configs/ folder; without it the command uses the defaults)."""
    import yaml

    preset = _CONFIGS / "model" / f"{config['model']['name']}.yaml"
    overrides = []
    if preset.is_file():
        defaults = dict(_leaves(yaml.safe_load(preset.read_text()) or {}))
        for key, value in _leaves(config["model"]):
            if key.split(".")[0] in _NOT_OVERRIDDEN or key not in defaults:
                continue
            default = defaults[key]
            if isinstance(default, str) and "${" in default:  # an interpolation: its resolved value is not written
                continue
            if default != value:
                overrides.append(f"model.{key}={_override_value(value)}")
    trainer = config.get("trainer", {})
    for hardware in sorted((_CONFIGS / "hardware").glob("*.yaml")):
        entries = yaml.safe_load(hardware.read_text()).get("trainer", {})
        if (entries.get("accelerator"), entries.get("precision")) == (trainer.get("accelerator"),
                                                                        trainer.get("precision")):
            if hardware.stem != "cpu":
                overrides.append(f"hardware={hardware.stem}")
            break
    else:
        if trainer.get("precision") is not None:  # no hardware preset has it: name the precision itself
            overrides.append(f"trainer.precision={trainer['precision']}")
    return overrides


#: model settings the reproduce command leaves to the preset: its identity and the weight files (local paths on the
#: machine that ran the evaluation; the uploaded student is named separately)
_NOT_OVERRIDDEN = ("_target_", "name", "family", "tokenizer", "teacher", "student")


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping entry of a nested config."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def eval_command(result: EvalResult, repo_id: str) -> str:
    """The ``python -m dd.eval`` command that samples the same images from the uploaded student (same sampler,
    schedule, seeds, labels and sample count; metric settings that differ from the defaults are named too)."""
    config, sampler = result.config, result.metrics["sampler"]
    parts = ["python -m dd.eval", f"model={config['model']['name']}", f"sampler={sampler['kind']}"]
    if "t_list" in sampler:
        parts += [f"schedule.t_list={_override_value(sampler['t_list'])}", f"schedule.split_t={sampler['split_t']}"]
    if "teacher_start_t" in sampler:
        parts.append(f"teacher_start_t={sampler['teacher_start_t']}")
    parts += [f"num_samples={config['num_samples']}", f"seed_base={config['seed_base']}",
              f"labels={_override_value(config['labels'])}", *_preset_overrides(config)]
    for key in ("teacher_dtype", "student_dtype"):
        if config.get(key) is not None:
            parts.append(f"{key}={config[key]}")
    if (config.get("student") or {}).get("checkpoint_key") is not None:
        parts.append(f"student.checkpoint_key={config['student']['checkpoint_key']}")
    if "student" in result.metrics.get("checksums", {}):
        parts.append(f"student.checkpoint={HF_PREFIX}{repo_id}/{STUDENT_FILE}")
    reference = config.get("metrics", {}).get("reference")
    if reference not in (None, "bundled"):
        parts.append(f"metrics.reference=/path/to/{Path(str(reference)).name}")
    return " ".join(parts)


def _steady_seconds(timing: Mapping[str, Any]) -> float | None:
    """Sampling seconds per image at steady state (warm-up batches left out; all batches when there was one)."""
    steady = timing.get("sampling_s_per_image_steady")
    return steady if steady is not None else timing.get("sampling_s_per_image")


def _results_table(evals: Sequence[EvalResult]) -> list[str]:
    lines = ["| evaluation | sampler | #Step | samples | FID | IS | precision | recall | label accuracy | "
             "sampling s/img (steady) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in evals:
        m, metrics = result.metrics, result.metrics.get("metrics", {})
        fid = _fmt(metrics.get("fid"), 2) + (" *" if m.get("fid_is_proxy") and metrics.get("fid") is not None else "")
        lines.append(f"| [{result.name}]({EVALS_DIR}/{result.name}/metrics.json) | {m['sampler']['name']} | "
                     f"{m['steps']} | {m['num_samples']} | {fid} | {_fmt(metrics.get('isc_mean'), 2)} | "
                     f"{_fmt(metrics.get('precision'))} | {_fmt(metrics.get('recall'))} | "
                     f"{_fmt(metrics.get('label_accuracy'))} | {_fmt(_steady_seconds(m['timing']), 4)} |")
    reasons = sorted({r.metrics["fid_proxy_reason"] for r in evals if r.metrics.get("fid_proxy_reason")})
    if reasons:
        lines += ["", "\\* proxy FID, not comparable with the paper's FID-50k: " + "; ".join(reasons) + "."]
    return lines


def _front_matter(spec: Any, model: Mapping[str, Any], license_id: str) -> list[str]:
    lines = ["---", f"license: {license_id}", "tags:", "- distilled-decoding", "- image-generation",
             "- autoregressive", "- class-conditional", f"- {spec.family}"]
    teacher = str(model.get("teacher", {}).get("checkpoint"))
    if teacher.startswith(HF_PREFIX):
        lines.append("base_model: " + "/".join(teacher[len(HF_PREFIX):].split("/")[:2]))
    return lines + ["---", ""]


def _layout(spec: Any) -> str:
    ema_key, raw_key = spec.export_keys
    return (f"the EMA weights under `{ema_key}` (what dd and the official DD scripts load by default) and the raw "
            f"weights under `{raw_key}`")


def model_card(repo_id: str, export: Export, evals: Sequence[EvalResult], license_id: str) -> str:
    """README.md of the Hub repository (Hugging Face model card: YAML front matter, then markdown)."""
    model, schedule = export.config["model"], export.config.get("schedule", {})
    spec = spec_from_config(model)
    reference = f"{HF_PREFIX}{repo_id}/{STUDENT_FILE}"
    lines = _front_matter(spec, model, license_id)
    lines += [f"# Distilled Decoding student of `{spec.name}`", "",
              f"A few-step class-conditional image generator distilled with Distilled Decoding "
              f"([arXiv 2412.17153](https://arxiv.org/abs/2412.17153)) from the {spec.family} teacher of preset "
              f"`{spec.name}` by dd (`python -m dd.generate_pairs`, `python -m dd.train`, uploaded with "
              f"`python -m dd.push`).", "",
              "## Teacher", "",
              f"* preset `{spec.name}`: {spec.num_classes} classes, {spec.image_size} px images, "
              f"{spec.num_timesteps} AR steps counted in {spec.timestep_unit} ({spec.sequence_length} tokens)",
              f"* teacher weights `{model.get('teacher', {}).get('checkpoint')}`, tokenizer "
              f"`{model.get('tokenizer', {}).get('checkpoint')}`",
              f"* teacher state-dict sha256 `{export.config.get('teacher_sha256')}` (the weights the training pairs "
              f"came from; `dd.checkpoint.state_dict_sha256`)", "",
              "## Schedule and training", "",
              f"* `t_list` {schedule.get('t_list')} and `split_t` {schedule.get('split_t')} (in {spec.timestep_unit})"
              f": {len(schedule.get('t_list', []))} student steps; `t_list` [0] gives 1 step",
              f"* {export.config.get('global_step')} training steps; last validation: "
              + (", ".join(f"{k} {_fmt(v)}" for k, v in sorted(export.config.get("metrics", {}).items())
                           if k.startswith("val/")) or "-"), "",
              "## Files", "",
              f"* `{STUDENT_FILE}`: the exported student in the official DD layout of its family: {_layout(spec)}",
              f"* `{CONFIG_FILE}`: its training config (model preset, schedule, steps, metrics, teacher checksum)",
              f"* `{EVALS_DIR}/<name>/`: metrics.json, config.json and grid.png of each evaluation below", ""]
    if evals:
        lines += ["## Results", "", *_results_table(evals), ""]
        lines += [f"![{r.name}]({EVALS_DIR}/{r.name}/grid.png)" for r in evals
                  if (r.directory / "grid.png").is_file()] + [""]
        lines += ["## Reproduce", "", "With dd installed (`pip install -e .` in a clone of its repository):", "",
                  "```bash", *(eval_command(r, repo_id) for r in evals), "```", ""]
    lines += ["## Use from Python", "", "```python", "from dd.models.presets import spec_from_yaml", "",
              f'spec = spec_from_yaml("configs/model/{spec.name}.yaml")',
              "family = spec.build_family()   # tokenizer + teacher of the preset",
              f'student = spec.build_student(family.codebook(), init="checkpoint", checkpoint="{reference}")',
              "```", "",
              "## Licence", "",
              f"The student weights are released under `{license_id}`. They were distilled from the teacher "
              f"`{model.get('teacher', {}).get('checkpoint')}`: its licence and that of its training data apply as "
              f"well.", "",
              "## Checksums", "", f"* `{STUDENT_FILE}` sha256 `{export.sha256}`", ""]
    return "\n".join(lines)


# -- the folder ----------------------------------------------------------------------------------------------------
def _place(source: Path, target: Path) -> None:
    """A hard link where possible (a multi-GB export is not duplicated), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _prepare_folder(folder: Path) -> None:
    """An empty folder: a folder left by an earlier push is replaced (every file in it would be uploaded), anything
    else is refused."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MANIFEST_FILE).is_file():
            raise HubError(f"folder={folder} exists and was not assembled by dd.push; everything in it would be "
                           f"uploaded, so choose an empty or new folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def build_folder(folder: str | os.PathLike[str], repo_id: str, export: Export, evals: Sequence[EvalResult],
                 license_id: str) -> Path:
    """Assemble the upload folder (layout in the module docstring); returns its path."""
    folder = Path(folder).expanduser()
    _prepare_folder(folder)
    _place(export.path, folder / STUDENT_FILE)
    shutil.copy2(Path(str(export.path) + ".json"), folder / CONFIG_FILE)
    for result in evals:
        target = folder / EVALS_DIR / result.name
        target.mkdir(parents=True)
        for name in EVAL_FILES:
            if (result.directory / name).is_file():
                shutil.copy2(result.directory / name, target / name)
    (folder / CARD_FILE).write_text(model_card(repo_id, export, evals, license_id))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    manifest = {"repo_id": repo_id, "created_at": dt.datetime.now().isoformat(timespec="seconds"),
                "student": str(export.path), "evals": [str(r.directory) for r in evals],
                "files": {name: file_sha256(folder / name) for name in files}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return folder


# -- the upload ----------------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    checker = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.2.1; before: a module constant
    library = checker() if callable(checker) else bool(getattr(constants, "HF_HUB_OFFLINE", False))
    return library or flag.lower() in ("1", "true", "yes", "on")


def hub_token(token: str | None) -> str:
    """The token to upload with (the given one, else HF_TOKEN or the stored login); refuses offline mode."""
    if _offline():
        raise HubError(f"HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it on a machine with network "
                       f"access, {AUTH_HINT}, and run the command again (dry_run=true builds the folder only)")
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError(f"no Hugging Face token found: {AUTH_HINT} (dry_run=true builds the folder without one)")
    return token


def upload(folder: Path, repo_id: str, token: str | None = None, private: bool = False,
           revision: str | None = None, commit_message: str | None = None) -> str:
    """Create the model repository if needed and upload ``folder`` as one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import HfHubHTTPError

    api = HfApi(token=hub_token(token))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload DD student ({folder.name}, dd.push)")
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        hint = f"; {AUTH_HINT}" if status in (401, 403) else ""
        raise HubError(f"the Hub refused the upload to {repo_id} ({_first_line(err)}){hint}") from err
    except _transport_errors() as err:
        raise HubError(f"could not reach the Hugging Face Hub ({_first_line(err)}); the folder {folder} is complete, "
                       f"run the command again with network access") from err
    return str(getattr(commit, "commit_url", commit))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors of an unreachable Hub, whichever HTTP client this huggingface_hub uses: OSError covers requests'
    ConnectionError and OfflineModeIsEnabled, httpx / httpx2 raise their own TransportError."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
