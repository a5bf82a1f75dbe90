"""The ``pyro-vae`` command: its subcommands and help, one-line errors, replaying a run
from its ``config.json``, and the one Ctrl-C policy of the training commands."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae.cli import fit as fit_cli
from pyro_vae.cli import fit_ssvae as fit_ssvae_cli
from pyro_vae.cli.main import COMMANDS, main
from tests.helpers import REPO, assert_one_line_error, pyro_vae, run_script

#: a run of seconds: 256 training and 256 test images, one epoch of two batches.
TINY = ["--limit", 256, "--test-limit", 256, "--epochs", 1, "--batch-size", 128, "--no-progress"]
SSVAE = ["--latent-dim", 4, "--hidden", 32, "--labels-per-class", 2]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the command and its help
def test_the_installed_command_lists_its_subcommands_and_their_options():
    """What ``pip install -e .`` puts beside the interpreter ([project.scripts])."""
    command = Path(sys.executable).parent / "pyro-vae"
    assert command.is_file(), f"{command} is missing: run pip install -e . to install it"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([command, "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in done.stdout, done.stdout
    done = subprocess.run([command, "fit", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pyro-vae fit")
    for option in ("--likelihood", "--config", "--lr-schedule", "--resume", "--out"):
        assert option in done.stdout


def test_the_command_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae.cli.main", "fit-ssvae", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.startswith("usage: pyro-vae fit-ssvae") and "--labels-per-class" in done.stdout
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_its_help(command, capsys):
    code, out, _ = pyro_vae(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: pyro-vae {command} ")


def test_no_command_or_an_unknown_one_is_one_line(capsys):
    code, _, err = pyro_vae(capsys)
    assert_one_line_error(code, err, "name a command", "fit-ssvae")
    code, _, err = pyro_vae(capsys, "train")
    assert_one_line_error(code, err, "unknown command 'train'", "fit")
    code, out, _ = pyro_vae(capsys, "--help")
    assert code == 0 and "tokenize" in out


def test_no_library_module_parses_a_command_line():
    """argparse lives in pyro_vae.cli only: the library takes objects, not options."""
    for path in (REPO / "pyro_vae").glob("*.py"):
        assert "argparse" not in path.read_text(), path


# ---------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("script", ["fit.py", "fit_ssvae.py"])
@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_a_learning_rate_that_is_not_a_positive_number_is_one_line(
    script, lr, mnist_dir, tmp_path, capsys
):
    """``--lr nan`` used to end in Adam's ValueError traceback, after loading the data."""
    args = ["--data-dir", mnist_dir, *TINY, "--lr", lr, "--out", tmp_path / "run"]
    code = run_script(script, *args)
    assert_one_line_error(code, capsys.readouterr().err, "--lr must be a finite number > 0")
    assert not (tmp_path / "run").exists()
    command = "fit" if script == "fit.py" else "fit-ssvae"
    code, _, err = pyro_vae(capsys, command, *args)
    assert_one_line_error(code, err, f"pyro-vae {command}: error: --lr must be a finite number")


def test_a_device_and_an_accelerator_that_disagree_are_one_line(tmp_path, capsys):
    args = ["--device", "cpu", "--accelerator", "cuda", "--out", tmp_path / "run"]
    code, _, err = pyro_vae(capsys, "fit", *args)
    assert_one_line_error(code, err, "--device cpu and --accelerator cuda disagree")


def test_a_lost_process_is_one_line_naming_the_checkpoint(mnist_dir, tmp_path, capsys, monkeypatch):
    """What a process of a DDP run sees when another is killed (tests/test_engine.py runs
    the real thing): one line, no gloo traceback, and how to resume."""
    from pyro_vae.errors import ProcessLostError

    def lost(*args, **kwargs):
        raise ProcessLostError(
            "process 0 lost contact with another process of the run "
            "(Connection reset by peer); the last checkpoint is c.pt"
        )

    monkeypatch.setattr(fit_cli, "fit_vae", lost)
    code, _, err = pyro_vae(capsys, "fit", "--data-dir", mnist_dir, *TINY, "--out", tmp_path / "r")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "lost contact with another process" in err and "c.pt" in err


# ---------------------------------------------------------------- replaying a run
@pytest.fixture(scope="module")
def fitted_run(mnist_dir, tmp_path_factory) -> Path:
    """A run folder of ``pyro-vae fit``: a small model, one epoch on 256 images."""
    out = tmp_path_factory.mktemp("fit") / "run"
    args = ["fit", "--data-dir", mnist_dir, *TINY, "--latent-dim", 8, "--hidden", 64]
    assert main([str(a) for a in [*args, "--out", out]]) == 0
    return out


def test_config_json_holds_the_model_the_run_and_every_option(fitted_run):
    saved = json.loads((fitted_run / "config.json").read_text())
    assert saved["command"] == "fit"
    assert saved["model"]["latent_dim"] == 8 and saved["model"]["image_shape"] == [1, 28, 28]
    assert saved["run"]["epochs"] == 1 and saved["run"]["progress"] is False
    assert saved["run"]["checkpoint"] == str(fitted_run / "checkpoint.pt")
    assert saved["run"]["loggers"] == ["csv"]
    assert saved["args"]["out"] == str(fitted_run) and saved["args"]["hidden"] == 64
    assert "config" not in saved["args"] and "replayed_from" not in saved


def test_a_run_replays_from_its_config_with_overrides(fitted_run, tmp_path, capsys):
    config = fitted_run / "config.json"
    other = tmp_path / "other"
    code, out, err = pyro_vae(
        capsys, "fit", "--config", config, "--epochs", 2, "--lr-schedule", "cosine", "--out", other
    )
    assert code == 0, err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == [
        "1/2",
        "2/2",
    ]
    first, replay = (json.loads(p.read_text()) for p in (config, other / "config.json"))
    assert replay["model"] == first["model"]
    changed = {"epochs": 2, "lr_schedule": "cosine", "checkpoint": str(other / "checkpoint.pt")}
    changed["log_dir"] = str(other / "logs")
    assert replay["run"] == {**first["run"], **changed}
    assert replay["args"] == {
        **first["args"],
        "epochs": 2,
        "lr_schedule": "cosine",
        "out": str(other),
    }
    assert replay["replayed_from"] == str(config)
    assert [int(r["epoch"]) for r in rows(other / "history.csv")] == [1, 2]


def test_a_config_written_before_run_and_command_existed_still_replays(
    fitted_run, tmp_path, capsys
):
    saved = json.loads((fitted_run / "config.json").read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": saved["model"], "args": saved["args"]}))
    code, _, err = pyro_vae(capsys, "fit", "--config", old, "--out", tmp_path / "run")
    assert code == 0, err
    replay = json.loads((tmp_path / "run" / "config.json").read_text())
    assert replay["model"] == saved["model"] and replay["command"] == "fit"


def test_a_semi_supervised_run_replays_from_its_config(mnist_dir, tmp_path, capsys):
    first = tmp_path / "first"
    args = ["--data-dir", mnist_dir, *TINY, *SSVAE, "--out", first]
    code, _, err = pyro_vae(capsys, "fit-ssvae", *args)
    assert code == 0, err
    saved = json.loads((first / "config.json").read_text())
    assert saved["command"] == "fit-ssvae" and saved["model"]["num_classes"] == 10
    assert saved["model"]["latent_dim"] == 4 and saved["model"]["code_dims"] is None
    second = tmp_path / "second"
    code, _, err = pyro_vae(capsys, "fit-ssvae", "--config", first / "config.json", "--out", second)
    assert code == 0, err
    replay = json.loads((second / "config.json").read_text())
    assert replay["model"] == saved["model"]
    assert replay["args"] == {**saved["args"], "out": str(second)}


def test_a_replay_into_the_configs_own_folder_needs_resume(fitted_run, capsys):
    """Without --out a replay goes to the config's folder, which holds the run: refused
    unless --resume, and the message says how to pick another folder."""
    code, _, err = pyro_vae(capsys, "fit", "--config", fitted_run / "config.json")
    assert_one_line_error(code, err, "already holds a run; pass --resume", "unless you give --out")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json {", "is not JSON"),
        ('{"model": {}}', 'has no "args"'),
        ('["args"]', 'has no "args"'),
        ('{"args": {}}', 'has no "model"'),
        ('{"command": "fit-ssvae", "model": {}, "args": {}}', "config of a 'fit-ssvae' run"),
        ('{"command": "fit", "model": {}, "args": {"warp": 9}}', "does not know: warp"),
        (None, "no such file"),
    ],
)
def test_a_config_that_is_not_a_run_of_this_command_is_one_line(
    content, expected, tmp_path, capsys
):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, _, err = pyro_vae(capsys, "fit", "--config", path, "--out", tmp_path / "run")
    assert_one_line_error(code, err, f"--config {path}", expected)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- Ctrl-C
def interrupt_in_the_second_epoch(monkeypatch, module, trainer: str, part: str) -> None:
    """Make ``module.trainer`` press Ctrl-C at the first step after the first epoch (in
    the forward pass of the model's submodule ``part``), as a user would."""
    real = getattr(module, trainer)

    def train(model, *args, on_epoch=None, **kwargs):
        finished = []

        def after_epoch(record):
            finished.append(record)
            if on_epoch is not None:
                on_epoch(record)

        def press_ctrl_c(submodule, inputs):
            if finished and not getattr(press_ctrl_c, "pressed", False):
                press_ctrl_c.pressed = True
                os.kill(os.getpid(), signal.SIGINT)

        hook = getattr(model, part).register_forward_pre_hook(press_ctrl_c)
        try:
            return real(model, *args, on_epoch=after_epoch, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(module, trainer, train)


@pytest.mark.parametrize(
    ("command", "module", "trainer", "part", "extra"),
    [
        ("fit", fit_cli, "fit_vae", "encoder", ["--latent-dim", 4, "--hidden", 32]),
        ("fit-ssvae", fit_ssvae_cli, "fit_ssvae", "classifier", SSVAE),
    ],
)
def test_ctrl_c_saves_writes_the_finished_epochs_and_exits_130(
    command, module, trainer, part, extra, mnist_dir, tmp_path, capsys, monkeypatch
):
    """One policy for every training command: the checkpoint is saved, history.csv and
    metrics.json hold the finished epochs, one line says how to go on, and the status
    is 130; --resume then finishes the run."""
    out = tmp_path / "run"
    args = [command, "--data-dir", mnist_dir, *TINY, *extra, "--epochs", 2, "--out", out]
    with monkeypatch.context() as patch:
        interrupt_in_the_second_epoch(patch, module, trainer, part)
        code, _, err = pyro_vae(capsys, *args)
    assert code == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"interrupted: progress saved in {out / 'checkpoint.pt'}; continue with --resume"
    ), err
    assert "1 finished epoch in history.csv" in line and "Traceback" not in err
    assert [int(r["epoch"]) for r in rows(out / "history.csv")] == [1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["epochs"] == 1

    code, _, err = pyro_vae(capsys, *args, "--resume")
    assert code == 0, err
    assert [int(r["epoch"]) for r in rows(out / "history.csv")] == [1, 2]
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is False
