"""What `cnnlab train` shows: in an 80-column terminal (a pseudo-terminal read back through the
pyte terminal emulator) and in a log file; and bash completion of `cnnlab train`."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyte
import pytest
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import CONF_DIR

COLUMNS, ROWS = 80, 24
EPOCHS = 3
TRAIN = [sys.executable, "-m", "cnnlab.cli", "train", "data=synthetic", "data.n_train=128", "data.n_test=64",
         "model=baseline", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
         f"trainer.max_epochs={EPOCHS}", "tracking.log_model=false", "seed=3"]
NOISE = ("GPU available", "TPU available", "LitLogger", "LeafSpec")  # in train.log, not on the console
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train loss (\S+) acc (\S+)  val loss (\S+) acc (\S+)  (\S+) s")


def _in_terminal(cmd: list[str], cwd: Path) -> bytes:
    """Everything `cmd` writes to an 80x24 xterm (stdout and stderr, as a user sees them)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
    process = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, cwd=cwd, env=env,
                               start_new_session=True)
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the child side is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(parent)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-3000:]
    return output


def _screen_lines(output: bytes) -> list[str]:
    """The terminal's scrollback and final screen, one string per row, as pyte draws them."""
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
    pyte.ByteStream(screen).feed(output)
    rows = [*screen.history.top, *(screen.buffer[y] for y in range(ROWS))]
    return _unwrapped(["".join(row[x].data for x in range(COLUMNS)).rstrip() for row in rows])


def _unwrapped(rows: list[str]) -> list[str]:
    """Lines as printed: a full row that the terminal continued on the next one is joined with it
    (a long path in the final block; the epoch lines must fit a row and are checked to)."""
    lines: list[str] = []
    joining = False
    for row in rows:
        if joining:
            lines[-1] += row
        else:
            lines.append(row)
        joining = len(row) == COLUMNS
    return lines


def _history(runs: Path) -> list[dict]:
    (path,) = runs.glob("outputs/*/*/history.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_run_output(lines: list[str], runs: Path, tracked: bool = True) -> None:
    """Every epoch's line whole, equal to history.jsonl; the final block; none of the noise."""
    history = _history(runs)
    epoch_lines = [line for line in lines if line.startswith("epoch ") and "loss" in line]
    assert len(epoch_lines) == EPOCHS, "\n".join(lines)
    for line, row in zip(epoch_lines, history):
        found = EPOCH_LINE.fullmatch(line)
        assert found, f"cut or changed: {line!r}"
        assert len(line) <= COLUMNS
        assert found.groups() == (str(row["epoch"]), str(EPOCHS), *(
            f"{row[k]:.4f}" for k in ("train/loss", "train/acc", "val/loss", "val/acc")), f"{row['seconds']:.1f}")
    assert [row["epoch"] for row in history] == [1, 2, 3]

    best = min(history, key=lambda row: row["val/loss"])  # checkpoint.monitor val/loss, mode min
    (run_dir,) = runs.glob("outputs/*/*/")
    start = lines.index(f"done after epoch {EPOCHS}")
    block = lines[start:start + 7]
    assert block[1] == f"  best epoch {best['epoch']} by val/loss (min): val/loss {best['val/loss']:.4f}  " \
                       f"val/acc {best['val/acc']:.4f}"
    assert re.fullmatch(r"  test \(checkpoint.test=last, epoch 3\): test/loss \d\.\d{4}  test/acc \d\.\d{4}", block[2])
    if tracked:
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        experiment = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db").get_run(run_id).info.experiment_id
        assert block[3:] == [f"  MLflow run {run_id}; to see it, run",
                             f"    mlflow ui --backend-store-uri sqlite:///{runs.resolve()}/mlflow.db", "  and open",
                             f"    http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"]
    else:
        assert block[3:] == ["  tracking off: no MLflow run"]

    shown = "\n".join(lines)
    log = (run_dir / "train.log").read_text()
    for noise in NOISE:
        assert noise not in shown and noise in log, noise
    assert not any(line.startswith("Epoch ") for line in lines)  # Lightning's own bar, 0-based


def test_terminal_shows_every_epoch_line_whole_above_the_bar(tmp_path):
    output = _in_terminal([*TRAIN, f"paths.runs={tmp_path}"], tmp_path)
    assert b"\x1b[" in output and "━".encode() in output, "no bar was drawn"
    assert b"epoch 1/3 val" in output  # the bar counts epochs from 1, as the lines do
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode())  # without colours and cursor moves
    assert re.search(r"epoch 3/3 [━╺╸][^\r\n]* 1/4 [^\r\n]*loss \d\.\d{4}", plain)  # batches, running loss
    # The screen as the bar of epoch 2 is first drawn (cut before its next redraw erases it): the bar is
    # on the row below the line of epoch 1, which stays whole.
    drawn = output.index(b"epoch 2/3 \x1b[")
    rows = _screen_lines(output[:output.rindex(b"\r", 0, output.index(b"epoch 2/3 ", drawn + 1))])
    rows = [row for row in rows if row]
    assert rows[-1].startswith("epoch 2/3 ") and "━" in rows[-1] and len(rows[-1]) <= COLUMNS
    assert EPOCH_LINE.fullmatch(rows[-2]) and rows[-2].startswith("epoch 1/3  train")
    lines = _screen_lines(output)
    _check_run_output(lines, tmp_path)
    assert not any("━" in line for line in lines), "the bar stays on screen after the run"


def test_log_file_has_no_bar_and_no_control_codes(tmp_path):
    with open(tmp_path / "out.log", "wb") as out:
        subprocess.run([*TRAIN, f"paths.runs={tmp_path}", "tracking=none"], stdout=out, stderr=subprocess.STDOUT,
                       check=True, cwd=tmp_path, timeout=60)
    output = (tmp_path / "out.log").read_bytes()
    assert b"\x1b" not in output and b"\r" not in output
    _check_run_output(output.decode().splitlines(), tmp_path, tracked=False)


def test_bash_completes_subcommands_and_hydra_overrides(tmp_path):
    # `cnnlab` on PATH runs this checkout (the script calls the command it completes).
    (tmp_path / "cnnlab").write_text(f'#!/bin/sh\nexec {sys.executable} -m cnnlab.cli "$@"\n')
    (tmp_path / "cnnlab").chmod(0o755)
    # As bash calls a completion function: the line, the cursor, the words, the current word's index.
    script = r'''
    eval "$(cnnlab completion bash)"
    complete_line() {
        COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
        read -ra COMP_WORDS <<< "$COMP_LINE"
        [[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
        COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
        COMPREPLY=()
        _cnnlab_completion
        echo "${COMPREPLY[*]}"
    }
    complete_line "cnnlab tr"
    complete_line "cnnlab train mod"
    complete_line "cnnlab train model="
    complete_line "cnnlab train seed=1 trainer.max_ep"
    '''
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    subcommand, group, presets, key = (line.split() for line in done.stdout.splitlines())
    assert subcommand == ["train"]
    assert "model=" in group and all(word.startswith("model") for word in group)
    presets_on_disk = {p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")}
    assert {"model=baseline", "model=resnet"} <= set(presets) == {f"model={name}" for name in presets_on_disk}
    assert key == ["trainer.max_epochs="]


def test_epoch_line_fits_80_columns_up_to_999_epochs():
    from cnnlab.training.run_text import epoch_line

    row = {"epoch": 100, "seconds": 999.94, "train/loss": 2.30258, "train/acc": 0.1, "val/loss": 2.30259,
           "val/acc": 0.10004, "val/acc_best": 0.2, "train/lr": 0.001}
    line = epoch_line(row, 999)
    assert line == "epoch 100/999  train loss 2.3026 acc 0.1000  val loss 2.3026 acc 0.1000  999.9 s"
    assert len(line) <= COLUMNS


def test_dashboard_for_each_kind_of_store(tmp_path, monkeypatch):
    from cnnlab.tracking.dashboard import dashboard

    monkeypatch.chdir(tmp_path)
    command, url = dashboard("sqlite:///runs/mlflow.db", "4", "r1")  # a relative store becomes absolute
    assert command == f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert url == "http://127.0.0.1:5000/#/experiments/4/runs/r1"
    assert dashboard("http://mlflow-host:5000/", "4", "r1") == (None, "http://mlflow-host:5000/#/experiments/4/runs/r1")
    command, _ = dashboard("postgresql://me:secret@db/mlflow", "4", "r1")
    assert command == "mlflow ui --backend-store-uri postgresql://me:***@db/mlflow"


def test_hydra_help_and_train_sc_install_give_cnnlab_completion(capsys):
    from cnnlab.cli import main

    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert main(["train", "-sc", "install=bash"]) == 0  # what `cnnlab train --hydra-help` tells users to eval
    assert capsys.readouterr().out == script and "complete -o default -F _cnnlab_completion cnnlab" in script
    with pytest.raises(SystemExit):
        main(["train", "--hydra-help"])
    assert 'eval "$(cnnlab train -sc install=bash)"' in capsys.readouterr().out
