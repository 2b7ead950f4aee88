"""The README's commands keep working: every `cnnlab` line in its bash blocks is run (summary,
compare on a tiny store, --help) or composed and checked (train), so README drift fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.cli import COMMANDS, main
from cnnlab.config.compose import compose, container
from cnnlab.config.schema import check_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[list[str]]:
    """Every `cnnlab ...` line of the README's ```bash blocks, comments and continuations joined."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("cnnlab "):
                lines.append(shlex.split(line)[1:])
    return lines


COMMAND_LINES = _commands()


def test_the_readme_shows_every_subcommand():
    assert {argv[0] for argv in COMMAND_LINES} >= {"train", "summary", "compare", "reproduce", "report", "audit",
                                                   "ablate", "evaluate", "predict"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "usage" in shown.lower() or "== Configuration groups ==" in shown  # train: Hydra's own help


@pytest.mark.parametrize("argv", [a for a in COMMAND_LINES if a[0] == "summary"], ids=" ".join)
def test_readme_summaries_run(argv, capsys):
    status = main(argv)
    shown = "model=lenet" in argv  # the README says this one fails, and why
    assert status == (2 if shown else 0)
    if not shown:
        assert "Total params" in capsys.readouterr().out or "--json" in argv


def _tiny_store(runs: Path, experiment: str) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db")
    eid = client.create_experiment(experiment)
    for kernels, base in (("[5]", 0.55), ("[3, 3]", 0.56)):
        for seed in range(3):
            run = client.create_run(eid)
            client.log_param(run.info.run_id, "model.kernels", kernels)
            client.log_param(run.info.run_id, "seed", str(seed))
            for key in ("val/acc_best", "test/acc"):
                client.log_metric(run.info.run_id, key, base + 0.01 * seed, step=5)
            client.set_terminated(run.info.run_id)


@pytest.mark.parametrize("argv", [a for a in COMMAND_LINES if a[0] in ("compare", "report")
                                  and not any(t.startswith("<") for t in a)], ids=" ".join)
def test_readme_comparisons_run_on_a_tiny_store(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    _tiny_store(runs, argv[1])
    server = "--tracking-uri" in argv or "--uri" in argv
    if server:  # the same command against the tiny store: only the option's name is under test
        flag = argv.index("--tracking-uri") if "--tracking-uri" in argv else argv.index("--uri")
        argv = [*argv[:flag], argv[flag], f"sqlite:///{runs.resolve()}/mlflow.db", *argv[flag + 2:]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kernels=[5]" in out or "report.md" in out


@pytest.mark.parametrize("argv", [a for a in COMMAND_LINES if a[0] in ("reproduce", "audit", "ablate", "evaluate",
                                                                       "predict")],
                         ids=" ".join)
def test_readme_options_of_other_commands_exist(argv, capsys):
    with pytest.raises(SystemExit):
        main([argv[0], "--help"])
    shown = capsys.readouterr().out
    for token in argv[1:]:
        if token.startswith("--"):
            assert token.split("=")[0] in shown, f"README uses {token} which `cnnlab {argv[0]}` does not know"


@pytest.mark.parametrize("argv", [a for a in COMMAND_LINES if a[0] == "train"], ids=" ".join)
def test_readme_trainings_compose_and_pass_the_schema(argv, monkeypatch):
    """Composed and checked, not trained: sweep values (a,b) and launcher settings are left out."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000")
    overrides = [t for t in argv[1:] if t != "-m" and "," not in t and not t.startswith(("hydra.", "hydra/"))]
    check_config(container(compose(overrides)))
