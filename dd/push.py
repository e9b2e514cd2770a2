"""``python -m dd.push repo_id=<org>/<name> [student=...] [evals=[...]] [dry_run=true]``: share a student on the Hub.

Builds the upload folder with :mod:`dd.hub` (the export, its config, the evaluations' results and a generated model
card), then creates the model repository if needed and uploads the folder as one commit. ``dry_run=true`` stops after
the folder. Every expected failure (missing export, evaluation of another model, no token, offline, the Hub refusing)
ends in one line saying what to do.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dd.hub import HubError
from dd.runs import ConfigError

log = logging.getLogger("dd.push")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check(cfg: dict[str, Any]) -> None:
    repo_id = cfg.get("repo_id")
    if not repo_id or not _REPO_ID.match(str(repo_id)):
        raise ConfigError(f"repo_id={repo_id!r}: pass repo_id=<user or org>/<name>, the Hub model repository to "
                          f"upload to (created when missing)")
    if not isinstance(cfg.get("evals", []), list):
        raise ConfigError(f"evals={cfg.get('evals')!r}: pass a list of dd.eval folders, e.g. evals=[outputs/eval/a]")


def folder_of(cfg: dict[str, Any]) -> Path:
    return Path(cfg["folder"] or Path("outputs") / "push" / str(cfg["repo_id"]))


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the folder and (unless ``dry_run``) upload it; returns {folder, repo_id, files, url}."""
    from dd import hub

    _check(cfg)
    try:
        export = hub.read_export(cfg["student"])
        evals = hub.read_evals(cfg.get("evals") or [], export)
        if not cfg.get("dry_run"):
            hub.hub_token(cfg.get("token"))  # fail before assembling a multi-GB folder
        folder = hub.build_folder(folder_of(cfg), cfg["repo_id"], export, evals, str(cfg["license"]))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        url = None
        if not cfg.get("dry_run"):
            url = hub.upload(folder, cfg["repo_id"], cfg.get("token"), bool(cfg.get("private")), cfg.get("revision"),
                             cfg.get("commit_message"))
    except HubError as err:
        raise ConfigError(str(err)) from err
    return {"folder": str(folder), "repo_id": cfg["repo_id"], "files": files, "url": url}


@hydra.main(version_base="1.3", config_path="../configs", config_name="push")
def main(cfg: DictConfig) -> None:
    from dd.runs import exit_cleanly_on_expected_errors

    with exit_cleanly_on_expected_errors("dd.push"):
        result = run(OmegaConf.to_container(cfg, resolve=True))
    if result["url"] is None:
        log.info("dry run: assembled %s (%d files); nothing uploaded", result["folder"], len(result["files"]))
    else:
        log.info("uploaded %s to %s (%s); load it with hf://%s/student_ema.pt", result["folder"], result["repo_id"],
                 result["url"], result["repo_id"])


if __name__ == "__main__":
    main()
