"""The `cnnlab` command and its subcommands (train, summary, compare, reproduce, report, audit, ablate,
evaluate, predict).

Every subcommand takes Hydra overrides (`model.bn=false data=synthetic`)
and prints bad input as one `error: ...` line with exit status 2. `train`
also prints a write the machine refused during the run (a full disk) as one
`error:` line, with exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from cnnlab.errors import BAD_INPUT, FAILED, ConfigError, TrainingError, fail

USAGE = """cnnlab <command> [options] [hydra overrides...]

commands:
  train     train and track one run (or a sweep with -m); Hydra's own flags apply
  summary   Keras-style model summary of the composed config (--json for JSON)
  compare   seed statistics and paired tests for an experiment or a sweep's parent run
  reproduce train a logged run's exact config again and compare every metric
  report    Markdown, HTML and LaTeX report of an ablation (experiment or sweep parent run)
  audit     train one config twice on a small budget; largest difference in metrics and weights
  ablate    run a preset's variants in rounds of seeds until each comparison is decided
  evaluate  a run's network on its test split (or other data): accuracy, per-class table, confusion matrix
  predict   the top-k classes of image files, with probabilities, by a run's network
  completion  tab completion: eval "$(cnnlab completion bash)" (subcommands; Hydra overrides after train)
"""


def _summary(argv: list[str]) -> int:
    from cnnlab.config.compose import compose
    from cnnlab.model.plan import model_plan
    from cnnlab.model.summary import summary_dict, summary_text

    parser = argparse.ArgumentParser(prog="cnnlab summary",
                                     description="Model summary from the composed config.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.bn=false")
    args = parser.parse_args(argv)
    from cnnlab.config.compose import container
    from cnnlab.training.budget import estimate_memory

    cfg = compose(args.overrides)
    plan = model_plan(cfg)
    memory = estimate_memory(plan, container(cfg.data), container(cfg.optim))
    print(json.dumps(summary_dict(plan), indent=2) if args.json else summary_text(plan, memory))
    return 0


def _train(argv: list[str]) -> int:
    from cnnlab.errors import Interrupted
    from cnnlab.training.signals import handled

    try:
        with handled():  # SIGTERM/SIGINT: one line and status 128 + the signal (cnnlab.training.signals)
            return _train_handled(argv)
    except Interrupted as error:
        from cnnlab.training.sweep import close_interrupted_sweep

        with handled():  # a second Ctrl-C while the parent run is marked: one line still
            sweep = close_interrupted_sweep(error, argv)
        return fail(Interrupted(error.signum, f"{error}; {sweep}") if sweep else error)


def _train_handled(argv: list[str]) -> int:
    from cnnlab.train import cli_main
    from cnnlab.training.checks import preflight

    if argv[:1] in (["-sc"], ["--shell-completion"]):
        # Hydra's help says `eval "$(cnnlab train -sc install=bash)"`: cnnlab's completion, which knows
        # that the app is `cnnlab train` (Hydra's would register a command named `cnnlab train`).
        return _completion(argv[1:2])
    preflight(argv)  # bad input: one error line and status 2, before Hydra writes anything
    # Hydra reads its flags (-m, --cfg ...) from argv, and names the app after argv[0] in its help.
    sys.argv = ["cnnlab train", *argv]
    if os.environ.get("HYDRA_FULL_ERROR"):
        cli_main()  # the user asked for Hydra's full tracebacks
        return 0
    # Without it, Hydra prints an error's traceback itself and exits 1; with it, the error comes
    # back here, where a failed write (a full disk mid-run) becomes one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        cli_main()
    except Exception as error:
        failed = _failed_write(error)
        if failed is None:
            raise  # not the machine's fault: a bug, shown with its traceback
        return fail(f"{failed}; free space or fix permissions where paths.runs points, then run "
                    f"the same command again to resume from the last checkpoint", FAILED)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0


# A write the machine refused: a full disk or quota, a file size limit, a read-only or vanished
# folder. SQLite says it in words (MLflow's store), the OS with an errno.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EIO, errno.ENOTDIR}
SQLITE_WRITE_ERRORS = ("database or disk is full", "disk I/O error", "attempt to write a readonly database",
                       "unable to open database file")


def _failed_write(error: BaseException) -> str | None:
    """One line for an error whose cause is a refused write, or None for any other error."""
    from hydra.errors import HydraException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (isinstance(current, OSError) and not isinstance(current, HydraException)
                and current.errno in WRITE_ERRNOS):
            code = errno.errorcode[current.errno]
            if current.filename:
                return f"cannot use {current.filename}: {current.strerror} ({code})"
            return f"a write failed: {current.strerror} ({code})"  # write() on an open file names none
        phrase = next((p for p in SQLITE_WRITE_ERRORS if p in str(current)), None)
        if phrase:
            return f"the MLflow store could not be written (SQLite: {phrase})"
        current = current.__cause__ or current.__context__
    return None


def _compare(argv: list[str]) -> int:
    from pathlib import Path

    from cnnlab.results.compare import compare, write_outputs

    parser = _comparison_parser("cnnlab compare", "Group runs by the knobs that vary; mean, std and 95%% CI "
                                "over seeds; every variant against the reference, with cited statistics.")
    parser.add_argument("--format", default="text", choices=("text", "markdown", "csv", "latex"))
    parser.add_argument("--out", default=None, help="also write .txt/.md/.csv/.tex and plots here")
    args = parser.parse_args(argv)
    uri = _store(args)
    result = compare(uri, **_comparison_args(args))
    print({"text": result.text, "markdown": result.markdown, "csv": result.csv,
           "latex": result.latex}[args.format]())
    if args.out:
        write_outputs(result, Path(args.out), uri)
    return 0


def _comparison_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """compare's and report's arguments: what to compare, where the store is, how."""
    from cnnlab.results.compare import DEFAULT_EFFECT
    from cnnlab.vocabulary import COMPARED_METRICS

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("target", help="an MLflow experiment name, or a sweep's parent run id")
    _store_options(parser)
    parser.add_argument("--metric", default=None, choices=COMPARED_METRICS,
                        help="the compared metric (default: test/acc when every run held out a validation "
                             "split, else val/acc_best, with a warning)")
    parser.add_argument("--reference", default=None,
                        help="the variant the others are compared with, e.g. 'kernels=[5]' (default: the "
                             "preset's control, else the first variant in the sweep's order)")
    parser.add_argument("--all-pairs", action="store_true", help="compare every pair (Holm-corrected)")
    parser.add_argument("--effect", type=float, default=DEFAULT_EFFECT,
                        help="the difference to plan seeds for (default: %(default)s)")
    parser.add_argument("--include-checks", action="store_true",
                        help="also count runs made by reproduce and audit as replicates")
    return parser


def _comparison_args(args: argparse.Namespace) -> dict:
    from cnnlab.results.compare import target

    return {**target(args.target), "metric": args.metric, "reference": args.reference,
            "all_pairs": args.all_pairs, "effect": args.effect, "include_checks": args.include_checks}


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs", help="the runs root holding mlflow.db (default: runs)")
    parser.add_argument("--tracking-uri", "--uri", dest="uri", default=None,
                        help="a tracking URI (sqlite:///..., http://HOST:PORT) instead of --runs")


def _store(args) -> str:
    from cnnlab.tracking.store import existing_store

    return existing_store(args.runs, args.uri)


def _reproduce(argv: list[str]) -> int:
    from pathlib import Path

    from cnnlab.results.reproduce import reproduce

    parser = argparse.ArgumentParser(prog="cnnlab reproduce", description=(
        "Train a logged run's exact config again, as a new run linked to it, and compare."))
    parser.add_argument("run_id", help="the MLflow run to reproduce")
    _store_options(parser)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="allowed absolute difference for every metric (default: 0 on the CPU; elsewhere "
                             "half the seed-to-seed std of the original's variant when known, else 1%% of "
                             "accuracies and 2%% of losses)")
    parser.add_argument("overrides", nargs="*", help="changes to the logged config, e.g. seed=1")
    args = parser.parse_args(argv)
    result = reproduce(_store(args), args.run_id, Path(args.runs).resolve(), args.overrides,
                       args.tolerance)
    print(result.text())
    return FAILED if result.differs else 0


def _report(argv: list[str]) -> int:
    from pathlib import Path

    from cnnlab.config.compose import slug
    from cnnlab.results.report import write_report

    parser = _comparison_parser("cnnlab report", "A self-contained report of one ablation: question, "
                                "architectures, results with intervals and tests, curves, provenance; "
                                "plus a LaTeX table.")
    parser.add_argument("--out", default=None, help="default: <runs>/reports/<target>")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs) / "reports" / slug(args.target)
    written = write_report(_store(args), out=out, **_comparison_args(args))
    print("\n".join(str(path) for path in written.values()))
    return 0


def _audit(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from cnnlab.results.audit import audit, audit_text

    parser = argparse.ArgumentParser(prog="cnnlab audit", description=(
        "Train one configuration twice (deterministic CPU, small budget) and report the "
        "largest difference in metrics and weights."))
    parser.add_argument("--runs", default="runs", help="the runs root (default: runs)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the config to audit")
    args = parser.parse_args(argv)
    result = audit(args.overrides, Path(args.runs))
    print(json.dumps(result, indent=2, default=str) if args.json else audit_text(result))
    return 0 if result["verdict"] == "identical" else 1


def _ablate(argv: list[str]) -> int:
    from cnnlab.results.ablate import Settings, ablate

    parser = argparse.ArgumentParser(prog="cnnlab ablate", description=(
        "Run an experiment preset's variants in rounds of seeds until every comparison with the control "
        "is decided (better, worse, or equivalent within --margin), with an error rate that holds "
        "under this optional stopping; or until --max-seeds."))
    parser.add_argument("experiment", help="an experiment preset (conf/experiment/NAME.yaml), e.g. rf")
    parser.add_argument("--max-seeds", type=int, default=20, help="seeds per variant at most (default: 20)")
    parser.add_argument("--margin", type=float, default=0.005,
                        help="differences smaller than this do not matter, in the metric's units "
                             "(default: 0.005 = half an accuracy point)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate (default: 0.05)")
    parser.add_argument("--round", type=int, default=2, dest="round_size",
                        help="seeds per variant added each round (default: 2)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.subset=10000 "
                                                     "hydra/launcher=joblib hydra.launcher.n_jobs=2")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    # One line per round and look on stderr (the rounds' own jobs log through Hydra).
    logging.basicConfig(level=logging.INFO, format="[ablate] %(message)s")
    outcome = ablate(Settings(args.experiment, tuple(args.overrides), args.max_seeds, args.margin, args.alpha,
                              args.round_size))
    print(outcome.text())
    return 0


def _loaded_run(args):
    """The run the serving commands work on (cnnlab.serving.load), quietly: no download bars."""
    from cnnlab.serving.load import load_run
    from cnnlab.tracking.reader import Reader

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    reader = Reader(_store(args))
    return reader, load_run(reader, args.run_id)


def _evaluate(argv: list[str]) -> int:
    from pathlib import Path

    from cnnlab.config.compose import slug
    from cnnlab.serving.evaluate import evaluate, log_to_run, write_files

    parser = argparse.ArgumentParser(prog="cnnlab evaluate", description=(
        "Evaluate a run's network (the checkpoint it tested) on its test split, or on the data the "
        "overrides give (same shape and classes): accuracy, per-class precision/recall/support, a "
        "confusion matrix (CSV, PNG), logged to the run under evaluate/."))
    parser.add_argument("run_id", help="the MLflow run to evaluate")
    _store_options(parser)
    parser.add_argument("--out", default=None, help="where the files go (default: <runs>/evaluations/<run-id>)")
    parser.add_argument("overrides", nargs="*", help="data overrides, e.g. data.n_test=500 or data=folder "
                                                     "data.root=DIR")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    reader, loaded = _loaded_run(args)
    result, _, _ = evaluate(loaded, args.overrides)
    out = Path(args.out) if args.out else Path(args.runs) / "evaluations" / slug(args.run_id)
    if args.overrides and not args.out:
        out = out / slug(" ".join(args.overrides))
    files = write_files(result, out)
    folder = log_to_run(reader, result, files, args.overrides)
    print(result.text())
    print(f"\nwrote {', '.join(str(f) for f in files)}; logged to run {args.run_id} under {folder}/")
    return 0


def _predict(argv: list[str]) -> int:
    from cnnlab.serving.predict import predict

    parser = argparse.ArgumentParser(prog="cnnlab predict", description=(
        "The top-k classes of image files (PNG, JPEG ...) by a run's network, with probabilities."))
    parser.add_argument("run_id", help="the MLflow run whose network predicts")
    parser.add_argument("images", nargs="+", help="image files of the run's input size")
    parser.add_argument("--top-k", type=int, default=1, help="classes shown per image (default: 1)")
    _store_options(parser)
    args = parser.parse_intermixed_args(argv)
    _, loaded = _loaded_run(args)
    for prediction in predict(loaded, args.images, args.top_k):
        print(prediction.text())
    return 0


def _completion(argv: list[str]) -> int:
    from cnnlab.completion import UNINSTALL, bash_script, query

    parser = argparse.ArgumentParser(prog="cnnlab completion", description=(
        'Tab completion: eval "$(cnnlab completion bash)" in bash (or in ~/.bashrc) completes the '
        "subcommands and, after `cnnlab train`, Hydra's config groups, keys and presets."))
    # install=bash, uninstall=bash, query=bash: Hydra's `-sc` values, from `cnnlab train -sc ...`
    parser.add_argument("shell", choices=("bash", "query", "install=bash", "uninstall=bash", "query=bash"),
                        help="bash: print the completion function; query: answer it (reads COMP_LINE, COMP_POINT)")
    args = parser.parse_args(argv)
    if args.shell in ("bash", "install=bash"):
        print(bash_script(list(COMMANDS)))
        return 0
    if args.shell == "uninstall=bash":
        print(UNINSTALL)
        return 0
    line = os.environ.get("COMP_LINE", "")
    query(line[:int(os.environ.get("COMP_POINT", len(line)))])
    return 0


COMMANDS = {"summary": _summary, "train": _train, "compare": _compare, "reproduce": _reproduce,
            "report": _report, "audit": _audit, "ablate": _ablate, "evaluate": _evaluate, "predict": _predict,
            "completion": _completion}


# Commands that train: started again once with glibc malloc settings (cnnlab/training/allocator.py).
TRAINING_COMMANDS = ("train", "reproduce", "audit")


def main(argv: list[str] | None = None) -> int:
    """The console script's entry (argv None: this process is the command's own) and the
    tests' (argv given)."""
    own_process = argv is None
    if own_process and sys.argv[1:2] and sys.argv[1] in TRAINING_COMMANDS:
        # Before anything heavy is imported: the restart pays for nothing twice.
        from cnnlab.training import collector
        from cnnlab.training.allocator import restart_with_settings

        restart_with_settings(["-m", "cnnlab.cli", *sys.argv[1:]])
        collector.defer()
    try:
        return _run(sys.argv[1:] if own_process else argv)
    finally:
        if own_process:
            from cnnlab.training import collector

            collector.before_exit()


def _run(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command '{command}'; allowed: {', '.join(COMMANDS)}", BAD_INPUT)
    try:
        return COMMANDS[command](rest)
    except (ConfigError, TrainingError, HydraException, OmegaConfBaseException) as error:
        return fail(error)  # bad input: status 2; a run that could not go on: status 1


if __name__ == "__main__":
    sys.exit(main())
