"""The entry points as users type them: an expected error (a wrong setting, a missing or corrupt file, weights not
available offline, logger=wandb without login or network) ends in one line naming the fix, exit status 1, no
traceback and nothing printed before it, within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import dd.eval as dd_eval
from dd.generate_pairs import run as run_pairs
from dd.runs import ConfigError
from dd.train import run as run_train

from test_pairs import compose_cfg

#: generous for a loaded 2-core machine: importing torch, Lightning and Hydra alone takes several seconds there
MAX_SECONDS = 60.0
#: GPT-L's teacher in float32 (342.9M parameters); a run that built it would hold at least this much more memory
GPT_L_TEACHER_BYTES = 342.9e6 * 4

# Runs a command and reports its peak resident memory (kB, Linux) on the last stderr line.
_PEAK_RSS = ("import resource, subprocess, sys\n"
             "code = subprocess.run(sys.argv[1:]).returncode\n"
             "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
             "sys.exit(code)\n")


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int

    @property
    def last_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]


def run_cli(module: str, *overrides: str, cwd: Path) -> CliResult:
    """``python -m <module> <overrides>`` in ``cwd`` (offline: the conftest sets HF_HUB_OFFLINE=1)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", module, *overrides], cwd=cwd,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    *lines, peak = proc.stderr.rstrip("\n").splitlines()
    assert peak.startswith("peak_rss_kb "), proc.stderr
    return CliResult(proc.returncode, proc.stdout, "\n".join(lines), seconds, int(peak.split()[1]) * 1024)


def assert_clean_failure(result: CliResult, prog: str, *fixes: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output
    assert [line for line in output.splitlines() if line.strip()] == [result.last_line], \
        f"expected the error line alone (no 'Seed set to' or other info lines before it):\n{output}"
    assert result.last_line.startswith(f"{prog}: "), output
    for fix in fixes:
        assert fix in result.last_line, result.last_line
    assert result.seconds < MAX_SECONDS, f"took {result.seconds:.0f} s"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=64", "shard_size=32",
                                             f"output_dir={out}"]))
    return out / "pairs"


@pytest.fixture(scope="module")
def missing_pairs_run(tmp_path_factory: pytest.TempPathFactory) -> CliResult:
    """``dd.train`` on the bundled gpt_tiny preset without pairs: fails after loading its (small) models."""
    cwd = tmp_path_factory.mktemp("no_pairs")
    return run_cli("dd.train", "data.pairs_dir=nowhere/pairs", cwd=cwd)


def test_train_without_pairs_says_how_to_generate_them(missing_pairs_run: CliResult) -> None:
    assert_clean_failure(missing_pairs_run, "dd.train", "no pairs at nowhere/pairs",
                         "python -m dd.generate_pairs model=gpt_tiny")


def test_train_gpt_l_offline_names_each_file_and_its_setting_without_building_the_model(
        tmp_path: Path, missing_pairs_run: CliResult) -> None:
    result = run_cli("dd.train", "model=gpt_l", "trainer.devices=8", cwd=tmp_path)
    assert_clean_failure(result, "dd.train", "HF_HUB_OFFLINE", "model.teacher.checkpoint=/path/to/c2i_L_256.pt",
                         "model.tokenizer.checkpoint=/path/to/vq_ds16_c2i.pt")
    assert "model.teacher.checkpoint=/path/to/vq_ds16_c2i.pt" not in result.last_line
    # No 343M-parameter teacher was allocated: the failing run needs about as much memory as a tiny-preset run.
    extra = result.peak_rss_bytes - missing_pairs_run.peak_rss_bytes
    assert extra < GPT_L_TEACHER_BYTES / 2, f"{extra / 2**20:.0f} MiB more than a gpt_tiny run"


def test_generate_pairs_var_d20_offline_is_one_line(tmp_path: Path) -> None:
    result = run_cli("dd.generate_pairs", "model=var_d20", cwd=tmp_path)
    assert_clean_failure(result, "dd.generate_pairs", "model.teacher.checkpoint=/path/to/var_d20.pth",
                         "model.tokenizer.checkpoint=/path/to/vae_ch160v4096z32.pth")


def test_train_on_a_corrupt_shard_names_it_and_the_fix(pairs_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "pairs"
    corrupt.mkdir()
    for path in pairs_dir.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    shard = sorted(corrupt.glob("*.pt"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    result = run_cli("dd.train", "model=gpt_test", f"data.pairs_dir={corrupt}", "max_steps=2", "batch_size=4",
                     cwd=tmp_path)
    assert_clean_failure(result, "dd.train", str(shard), "re-run generate_pairs")
    assert not (tmp_path / "outputs" / "train" / "gpt_test" / "checkpoints").exists(), "nothing half-written"


WANDB_FIXES = ("`wandb login`", "WANDB_MODE=offline", "logger=csv")
#: a tiny evaluation: random student weights, no metrics
TINY_EVAL = ("model=gpt_test", "student.checkpoint=random:0", "num_samples=4", "batch_size=4", "metrics.enabled=false")


@pytest.fixture
def wandb_without_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online wandb with no API key anywhere (a fresh HOME: no ~/.netrc); wandb fails before any network access."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_API_KEY", "NETRC", "WANDB_CONFIG_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)


def test_train_with_wandb_without_login_is_one_line(pairs_dir: Path, tmp_path: Path,
                                                     wandb_without_login: None) -> None:
    out = tmp_path / "run"
    result = run_cli("dd.train", "model=gpt_test", f"data.pairs_dir={pairs_dir}", f"output_dir={out}",
                     "max_steps=2", "batch_size=4", "logger=wandb", cwd=tmp_path)
    assert_clean_failure(result, "dd.train", "logger=wandb is unavailable (No API key configured", *WANDB_FIXES)
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists(), "nothing written"


def test_eval_with_wandb_without_login_is_one_line_before_sampling(tmp_path: Path, wandb_without_login: None) -> None:
    out = tmp_path / "eval"
    result = run_cli("dd.eval", *TINY_EVAL, f"output_dir={out}", "logger=wandb", cwd=tmp_path)
    assert_clean_failure(result, "dd.eval", "logger=wandb is unavailable (No API key configured", *WANDB_FIXES)
    assert not list(out.glob("parts/*")) and not (out / "samples.npz").exists() and not (out / "config.json").exists()


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb.init as it fails without network (after its 90 s init timeout), at once."""
    import wandb.errors
    from lightning.pytorch.loggers import WandbLogger

    def unreachable(self: WandbLogger) -> None:
        raise wandb.errors.CommError("Failed to get resume status for run x: context deadline exceeded\nwhile "
                                     "retrying: dial tcp: lookup api.wandb.ai: no such host")

    monkeypatch.setattr(WandbLogger, "experiment", property(unreachable))


def test_wandb_without_network_ends_train_and_eval_before_any_work(pairs_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    out = tmp_path / "run"
    expected = r"logger=wandb is unavailable \(Failed to get resume status for run x: context deadline exceeded\): " \
               r"the wandb server cannot be reached; set WANDB_MODE=offline"
    with pytest.raises(ConfigError, match=expected):
        run_train(compose_cfg("train", ["model=gpt_test", f"data.pairs_dir={pairs_dir}", f"output_dir={out}",
                                        "max_steps=2", "batch_size=4", "logger=wandb"]))
    assert not out.exists(), "nothing written"
    with pytest.raises(ConfigError, match=expected):
        dd_eval.run(compose_cfg("eval", [*TINY_EVAL, f"output_dir={tmp_path / 'eval'}", "logger=wandb"]))
    assert not list((tmp_path / "eval").glob("parts/*")) and not (tmp_path / "eval" / "samples.npz").exists()
