"""The fixed cost of one run (start-up + wrap-up): whole-process seconds of a 1-epoch synthetic run.

Two modes:

    python benchmarks/fixed_cost.py --repeats 5     # wall and CPU seconds of fresh processes,
                                                    # interleaved in rotating order
    python benchmarks/fixed_cost.py --timeline      # one run's phases: where its seconds go

Every measured command is the real one (`python -m cnnlab.cli train data=synthetic
trainer.max_epochs=1`), in a fresh process, against a store that already exists (one
untimed run creates it), with a fresh run directory each time. The variants:

    tracking on       the default (MLflow store, model logged)
    log_model=false   tracking on, no model logged
    tracking=none     no MLflow at all
    imports           `python -c "import torch, lightning, mlflow"`, for scale

The timeline runs the same command in a child process with timers around cnnlab's phases
(and around every top-level import, so each phase says how much of it was importing);
`--importtime` adds the child's `python -X importtime` totals per top-level package.

Two parts of the wrap-up and start-up, each side by side in fresh processes:

    python benchmarks/fixed_cost.py --parts --repeats 5
        imports: `import torch, lightning, mlflow` with the garbage collector as Python leaves
                 it vs as `cnnlab train` runs it (off during the imports, heap frozen at exit)
        store:   opening an existing store under the lock vs skipping that (the marker)
        model:   mlflow.pytorch.log_model of the baseline (pt2) with vs without MLflow's
                 serving-input validation (a second call in the process: warm)

    python benchmarks/fixed_cost.py --decode --repeats 2
        the CIFAR-10 copy loaded with an empty decode cache (decoding 60,000 JPEGs) vs from
        the cache a run under another paths.runs left (sha256 checked), a fresh process each

`--before DIR` measures another checkout as well (for example the commit before a change,
unpacked with `git archive COMMIT | tar -x -C DIR`), interleaved with this one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = ["-m", "cnnlab.cli", "train", "data=synthetic", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false"]
VARIANTS = {
    "tracking on": [*RUN],
    "log_model=false": [*RUN, "tracking.log_model=false"],
    "tracking=none": [*RUN, "tracking=none"],
    "imports": ["-c", "import torch, lightning, mlflow"],
}


def environment(code: Path = REPO) -> dict[str, str]:
    """The checkout `code`'s cnnlab and conf/ for the child processes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    env["CNNLAB_CONF"] = str(code / "conf")
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one fresh process, its children included. It runs
    in the measured checkout: `python -m` puts the working folder first on sys.path."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=env["PYTHONPATH"].split(os.pathsep)[0])
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read()
    process.stderr.close()
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} exited {process.returncode}:\n{error[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def compare(args) -> None:
    checkouts = {"": REPO, **({"before: ": Path(args.before).resolve()} if args.before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {label: Path(tmp) / f"runs{i}" for i, label in enumerate(checkouts)}
        for label, code in checkouts.items():  # creates each store; untimed
            timed([*RUN, f"paths.runs={roots[label]}", "tracking.log_model=false"], environment(code))
        cases = [(label, name) for label in checkouts for name in VARIANTS
                 if not (label and name == "imports")]
        results: dict[tuple[str, str], list[tuple[float, float]]] = {case: [] for case in cases}
        for repeat in range(args.repeats):
            shift = repeat % len(cases)
            for label, name in cases[shift:] + cases[:shift]:
                runs = roots[label]
                shutil.rmtree(runs / "outputs", ignore_errors=True)  # a fresh run every time
                argv = VARIANTS[name] + ([f"paths.runs={runs}"] if name != "imports" else [])
                results[(label, name)].append(timed(argv, environment(checkouts[label])))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{label}{name} {v[-1][0]:.2f} s" for (label, name), v in results.items()), flush=True)
    print(f"\n1-epoch synthetic run, fresh process each, store existing; {args.repeats} repeats "
          f"interleaved in rotating order" + (f"; before = {args.before}" if args.before else "") + "\n")
    print("| what | median wall s | min-max wall s | median CPU s (user+sys) |")
    print("|---|---|---|---|")
    for (label, name), values in results.items():
        walls = [w for w, _ in values]
        cpus = [c for _, c in values]
        print(f"| {label}{name} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} "
              f"| {statistics.median(cpus):.2f} |")
    if args.before:
        for name in VARIANTS:
            if ("before: ", name) in results:
                now = statistics.median(w for w, _ in results[("", name)])
                then = statistics.median(w for w, _ in results[("before: ", name)])
                print(f"{name}: after / before = {now / then:.3f}")


PARTS = {
    "imports, collector as Python leaves it": ["-c", "import torch, lightning, mlflow"],
    "imports, collector as cnnlab runs it": [
        "-c", "import gc; gc.disable(); import torch, lightning, mlflow; gc.freeze(); gc.enable()"],
}
STORE = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # imported either way: not what is measured
from mlflow.tracking import MlflowClient
from cnnlab.tracking import store
folder = Path(sys.argv[1]); uri = f"sqlite:///{folder / 'mlflow.db'}"
if sys.argv[2] == "lock": (folder / ".mlflow.db.mlflow-opened").unlink(missing_ok=True)
start = time.perf_counter()
store.create_sqlite_store(uri, folder)  # opens under the lock unless the marker matches
MlflowClient(tracking_uri=uri).get_experiment_by_name("Default")  # the run's first call
print("SECONDS", time.perf_counter() - start)
"""
MODEL = """
import sys, time, tempfile
import mlflow, mlflow.pytorch, torch
from mlflow.models import infer_signature
from cnnlab.config.compose import compose
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan
net = torch.nn.Sequential(build(model_plan(compose([])).analysis, logits=True), torch.nn.Softmax(1)).eval()
x = torch.rand(2, 3, 32, 32)
with torch.no_grad():
    signature = infer_signature(x.numpy(), net(x).numpy())
mlflow.set_tracking_uri(f"sqlite:///{sys.argv[1]}/mlflow.db")
client = mlflow.MlflowClient()
found = client.get_experiment_by_name("parts")
experiment = found.experiment_id if found else client.create_experiment(
    "parts", artifact_location=f"file://{sys.argv[1]}/artifacts")
def log(validate):
    with mlflow.start_run(experiment_id=experiment):
        start = time.perf_counter()
        mlflow.pytorch.log_model(net, name="model", signature=signature, input_example=x.numpy(),
                                 serialization_format="pt2",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                 validate_serving_input=validate)
        return time.perf_counter() - start
log(True)  # the first call in a process pays imports and one-off set-up
print("SECONDS", log(sys.argv[2] == "validate"))
"""


DECODE = """
import sys, time
from pathlib import Path
from cnnlab.config.compose import compose, container
from cnnlab.data.sources import load_dataset
import torch, torchvision  # imported either way: not what is measured
cfg = compose([f"data.archive={sys.argv[1]}", f"paths.runs={sys.argv[2]}", f"paths.cache={sys.argv[3]}"])
start = time.perf_counter()
data = load_dataset(container(cfg)["data"], Path(cfg.paths.cache), 0)
data.fingerprint()  # what a run computes next: free when the cache's digest was checked
print("SECONDS", time.perf_counter() - start)
"""
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def decode(args) -> None:
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        results: dict[str, list[float]] = {"empty cache: decode": [], "cache filled by another runs root": []}
        for repeat in range(args.repeats):
            shutil.rmtree(cache, ignore_errors=True)
            results["empty cache: decode"].append(
                seconds_printed(["-c", DECODE, str(ARCHIVE), f"{tmp}/runs-a", str(cache)], env))
            results["cache filled by another runs root"].append(
                seconds_printed(["-c", DECODE, str(ARCHIVE), f"{tmp}/runs-b", str(cache)], env))
            progress(repeat, args.repeats, results, digits=2)
    print(f"\nCIFAR-10 copy ({ARCHIVE.name}), load_dataset + fingerprint, {args.repeats} repeats\n")
    seconds_table(results, digits=2)


def progress(repeat: int, repeats: int, results: dict[str, list[float]], digits: int) -> None:
    print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
        f"{k} {v[-1]:.{digits}f} s" for k, v in results.items()), flush=True)


def seconds_table(results: dict[str, list[float]], digits: int) -> None:
    """Median and range of each case's seconds, as a markdown table."""
    print("| what | median s | min-max s |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.{digits}f} | {min(values):.{digits}f}-{max(values):.{digits}f} |")


def seconds_printed(argv: list[str], env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          cwd=env["PYTHONPATH"].split(os.pathsep)[0])
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(argv[:3])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return float(next(x for x in done.stdout.splitlines() if x.startswith("SECONDS")).split()[1])


def parts(args) -> None:
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from cnnlab.tracking.store import create_sqlite_store

        create_sqlite_store(f"sqlite:///{folder / 'mlflow.db'}", folder)
        cases = {**{name: (lambda argv=argv: timed(argv, env)[0]) for name, argv in PARTS.items()},
                 "store: locked open (no marker)": lambda: seconds_printed(["-c", STORE, tmp, "lock"], env),
                 "store: marker, no locked open": lambda: seconds_printed(["-c", STORE, tmp, "marker"], env),
                 "log_model, serving input validated": lambda: seconds_printed(["-c", MODEL, tmp, "validate"], env),
                 "log_model, not validated (cnnlab)": lambda: seconds_printed(["-c", MODEL, tmp, "skip"], env)}
        results: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(cases[name]())
            progress(repeat, args.repeats, results, digits=3)
    print(f"\n{args.repeats} repeats, interleaved in rotating order, a fresh process each\n")
    seconds_table(results, digits=3)


# --------------------------------------------------------------------------- timeline (child)

PHASES = [  # (module, attribute): the functions one run spends its time in, in order
    ("cnnlab.training.checks", "preflight"),
    ("cnnlab.training.run", "train"),
    ("cnnlab.data.sources", "load_dataset"),
    ("cnnlab.tracking.provenance", "provenance_tags"),
    ("cnnlab.training.resume", "open_run"),
    ("cnnlab.tracking.provenance", "log_provenance"),
    ("cnnlab.training.trainer", "make_trainer"),
    ("cnnlab.training.artifacts", "write_run_files"),
    ("cnnlab.training.artifacts", "log_run_files"),
    ("cnnlab.training.artifacts", "log_pytorch_model"),
    ("cnnlab.serving.pyfunc", "log_pyfunc_model"),
]


def child(argv: list[str]) -> None:
    """Run `cnnlab train argv` in this process with timers; print the events as JSON."""
    import importlib._bootstrap as bootstrap

    born = float(os.environ["CNNLAB_BENCH_T0"])
    events: list[tuple[str, float, float, float]] = []  # name, start, end, of which importing
    state = {"depth": 0, "imports": 0.0}
    find_and_load = bootstrap._find_and_load

    def wrap(name, function):
        def timed_call(*args, **kwargs):
            start, imports = time.time(), state["imports"]
            try:
                return function(*args, **kwargs)
            finally:
                events.append((name, start - born, time.time() - born, state["imports"] - imports))
        return timed_call

    def make_timed_trainer(make_trainer):
        def timed_make_trainer(*args, **kwargs):
            trainer = make_trainer(*args, **kwargs)
            trainer.fit = wrap("Trainer.fit", trainer.fit)
            trainer.test = wrap("Trainer.test", trainer.test)
            return trainer
        return timed_make_trainer

    # Timers go in as each module is first imported (importing them here would move their
    # imports, torch's among them, out of the phases that pay for them).
    pending = collections.defaultdict(list)
    for module, attribute in PHASES:
        pending[module].append(lambda m, a=attribute: setattr(m, a, wrap(a, getattr(m, a))))
    pending["cnnlab.training.trainer"].append(
        lambda m: setattr(m, "make_trainer", make_timed_trainer(m.make_trainer)))
    pending["cnnlab.tracking.writer"].append(
        lambda m: setattr(m.Tracker, "finish", wrap("Tracker.finish", m.Tracker.finish)))

    def patch(name):
        for install in pending.pop(name, ()):
            install(sys.modules[name])

    def timed_import(name, import_):
        if state["depth"]:
            module = find_and_load(name, import_)
        else:
            state["depth"] += 1
            start = time.time()
            try:
                module = find_and_load(name, import_)
            finally:
                state["imports"] += time.time() - start
                state["depth"] -= 1
        patch(name)
        return module

    bootstrap._find_and_load = timed_import
    ready = time.time() - born
    from cnnlab.cli import main

    sys.argv = ["cnnlab", "train", *argv]
    code = main()  # as the console script calls it: the process is the command's own
    done = time.time() - born
    print("TIMELINE " + json.dumps({"events": events, "ready": ready, "done": done,
                                   "imports": state["imports"], "code": code}), flush=True)


def import_totals(path: Path, top: int = 14) -> list[tuple[str, float]]:
    totals: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, _, name = line.split(":", 1)[1].split("|")
            totals[name.strip().split(".")[0]] += int(self_us) / 1e6
    return [(name, seconds) for name, seconds in totals.most_common(top)] + [
        ("(all)", sum(totals.values()))]


def timeline(args) -> None:
    code = Path(args.before).resolve() if args.before else REPO
    env = environment(code)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        store = [f"paths.runs={runs}"]
        timed([*RUN, *store, "tracking.log_model=false"], env)  # creates the store; untimed
        shutil.rmtree(runs / "outputs", ignore_errors=True)
        argv = [arg for arg in RUN[3:]] + store + args.overrides
        # The malloc settings `cnnlab train` restarts itself with, set here: the child's timers
        # would not survive that restart (the restart's own cost shows in --repeats).
        from cnnlab.training.allocator import SETTINGS

        env = {**env, **SETTINGS}
        flags = ["-X", "importtime"] if args.importtime else []
        env["CNNLAB_BENCH_T0"] = repr(time.time())
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *flags, str(Path(__file__).resolve()), "--child", *argv], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"error: the timed run failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("TIMELINE "))
        result = json.loads(line[len("TIMELINE "):])
        if args.importtime:
            log = runs / "importtime.txt"
            log.write_text(done.stderr)
            totals = import_totals(log)
    print(f"one run: cnnlab {' '.join(RUN[3:] + args.overrides)}, store existing, code {code}\n")
    print("| phase | starts at s | seconds | of which importing |")
    print("|---|---|---|---|")
    print(f"| interpreter start, harness ready | 0.00 | {result['ready']:.2f} | |")
    for name, begin, end, imports in sorted(result["events"], key=lambda e: e[1]):
        print(f"| {name} | {begin:.2f} | {end - begin:.2f} | {imports:.2f} |")
    print(f"| exit (after main returned) | {result['done']:.2f} | {wall - result['done']:.2f} | |")
    print(f"| **whole process** | | **{wall:.2f}** | {result['imports']:.2f} |")
    if args.importtime:
        print("\n`-X importtime`, self time summed per top-level package (inflated by the tracing):\n")
        print("| package | seconds |")
        print("|---|---|")
        for name, seconds in totals:
            print(f"| {name} | {seconds:.2f} |")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])  # cnnlab from PYTHONPATH: the checkout being measured
        return
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeline", action="store_true", help="one run's phases instead")
    parser.add_argument("--parts", action="store_true", help="imports, store check, model logging")
    parser.add_argument("--decode", action="store_true", help="CIFAR-10: decoding vs the shared cache")
    parser.add_argument("--importtime", action="store_true", help="with --timeline: import totals")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="another checkout: measured too (--repeats), or instead (--timeline)")
    parser.add_argument("overrides", nargs="*", help="with --timeline: extra overrides")
    args = parser.parse_args()
    if args.timeline:
        timeline(args)
    elif args.parts:
        parts(args)
    elif args.decode:
        decode(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
