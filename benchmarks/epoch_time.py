"""Seconds per epoch of the chapter's baseline: cnnlab (tracking on, off) vs a hand-written loop,
and whole-process seconds of `cnnlab train` vs the chapter's Keras program at 1, 3 and 5 epochs.

Per epoch: all three run in this one process, interleaved (A B C, B C A, C A B ...), on the
same data (CIFAR-10 copy, batch 32) and the same model, so the machine's noise
hits them alike. Each repeat trains `--epochs` epochs and keeps the last
epoch's time (the first pays one-off warm-up). An epoch is one pass over the
training set plus one evaluation pass over the test set, for all three.

Whole process (`--whole 1,3,5`): `python -m cnnlab.cli train` with its defaults (tracking on,
the model logged) in a fresh process per run, against a store that already exists and a
decode cache already filled, vs the Keras program in its own fresh process; interleaved in
rotating order. Wall seconds from start to exit: imports, data, training, wrap-up.

    python benchmarks/epoch_time.py                     # full CIFAR-10 copy
    python benchmarks/epoch_time.py --subset 10000      # quicker
    python benchmarks/epoch_time.py --whole ""          # per epoch only

With a tensorflow-cpu venv at runs/tfvenv (see benchmarks/keras_baseline.py), the
chapter's own Keras program runs in the same interleaving, on the same pixels.
The first lines name the machine: CPU model, cores and SIMD flags from /proc/cpuinfo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.data.batches import TensorBatches  # noqa: E402
from cnnlab.data.sources import load_dataset  # noqa: E402
from cnnlab.model.build import build  # noqa: E402
from cnnlab.model.plan import model_plan  # noqa: E402
from cnnlab.train import train  # noqa: E402
from cnnlab.training.allocator import in_effect, restart_with_settings  # noqa: E402
from cnnlab.training.artifacts import read_history  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
KERAS = "Keras (the chapter's program)"


def overrides(args, runs: Path, *extra: str) -> list[str]:
    return [f"paths.runs={runs}", f"data.archive={args.archive}", f"trainer.max_epochs={args.epochs}",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "tracking.log_model=false",
            *([f"data.subset={args.subset}"] if args.subset else []), *extra]


def cnnlab_epoch(args, runs: Path, tracking: bool, repeat: int) -> tuple[float, float]:
    cfg = compose(overrides(args, runs, f"tracking.enabled={str(tracking).lower()}",
                            f"tracking.run_name=bench-{tracking}-{repeat}", f"seed={repeat}"))
    train(cfg)
    folder = runs / "outputs" / "cnnlab" / f"bench-{tracking}-{repeat}"
    last = read_history(folder / "history.jsonl")[-1]
    return last["seconds"], last["val/acc"]


def hand_loop_epoch(args, runs: Path, repeat: int) -> tuple[float, float]:
    """What a researcher would write by hand: same model, same batches, no framework."""
    cfg = compose(overrides(args, runs, f"seed={repeat}"))
    data = load_dataset(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.paths.cache), repeat)
    torch.manual_seed(repeat)
    net = build(model_plan(cfg).analysis, logits=True)
    optimizer = make_optimizer(net.parameters(), dict(cfg.optim))
    # Passes are numbered 0, 1, ... as they start: the same (seed, epoch) order as cnnlab's.
    batches = TensorBatches(data.train_x, data.train_y, 32, shuffle=True, seed=repeat)
    tests = TensorBatches(data.test_x, data.test_y, cfg.data.eval_batch_size)
    return hand_epochs(net, optimizer, batches, tests, args.epochs)


def hand_epochs(net, optimizer, batches, tests, epochs: int) -> tuple[float, float]:
    """The hand-written loop itself (also benchmarks/resnet_epoch.py's): `epochs` passes of train +
    evaluation; the last pass's seconds and its validation accuracy."""
    for _ in range(epochs):
        start = time.perf_counter()
        net.train()
        # The same bookkeeping cnnlab does: epoch loss and accuracy, kept on the device.
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for x, y in batches:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        train_stats = (loss_sum.item(), correct.item())  # read once per epoch, like cnnlab's logs
        net.eval()
        val_loss, val_correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for x, y in tests:
                logits = net(x)
                val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                val_correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
        seconds = time.perf_counter() - start
        assert train_stats[1] >= 0
    return seconds, val_correct / seen


def keras_epoch(args, npz: Path, repeat: int) -> tuple[float, float]:
    """The chapter's own Keras program (benchmarks/keras_baseline.py) in its tensorflow venv."""
    command = [args.keras_python, str(REPO / "benchmarks" / "keras_baseline.py"), str(npz),
               "--epochs", str(args.epochs), "--seed", str(repeat),
               *(["--subset", str(args.subset)] if args.subset else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    last = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return last["seconds"], last["val_accuracy"]


SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def machine() -> str:
    """CPU model, cores, cache and SIMD flags (/proc/cpuinfo), memory, Python and library versions."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    memory = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal")).split()[1])
        memory = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import lightning

    return (f"machine: {info.get('model name', platform.processor() or 'unknown CPU')} "
            f"(vendor {info.get('vendor_id', '?')}, family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}), {os.cpu_count()} cores, cache {info.get('cache size', '?')}"
            f"{memory}\nSIMD flags: {' '.join(f for f in SIMD if f in flags) or 'none found'}\n"
            f"Python {platform.python_version()}, torch {torch.__version__}, lightning "
            f"{lightning.__version__}, torch threads {torch.get_num_threads()}")


def whole_cnnlab(args, runs: Path, epochs: int, repeat: int) -> float:
    """`cnnlab train` as a user runs it (defaults: tracking on, model logged), one fresh process."""
    shutil.rmtree(runs / "outputs", ignore_errors=True)  # a new run, not a resumed one
    command = [sys.executable, "-m", "cnnlab.cli", "train", f"paths.runs={runs}",
               f"data.archive={args.archive}", f"trainer.max_epochs={epochs}", f"seed={repeat}",
               "trainer.enable_progress_bar=false",
               *([f"data.subset={args.subset}"] if args.subset else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=child_env(), cwd=REPO)
    return time.perf_counter() - start


def whole_keras(args, npz: Path, epochs: int, repeat: int) -> float:
    command = [args.keras_python, str(REPO / "benchmarks" / "keras_baseline.py"), str(npz),
               "--epochs", str(epochs), "--seed", str(repeat),
               *(["--subset", str(args.subset)] if args.subset else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def child_env() -> dict[str, str]:
    """This checkout's cnnlab and conf/ for the `cnnlab` child processes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("CNNLAB_CONF", str(REPO / "conf"))
    return env


def whole_process(args, runs: Path, npz: Path, keras: bool) -> None:
    counts = [int(n) for n in args.whole.split(",") if n.strip()]
    runs = runs / "whole"
    # One untimed run creates the store (and fills the decode cache if it is empty).
    whole_cnnlab(args, runs, 1, 0)
    times: dict[tuple[str, int], list[float]] = {}
    names = ["cnnlab train", *(["Keras program"] if keras else [])]
    for repeat in range(args.repeats):
        order = [(name, n) for n in counts for name in names]
        shift = repeat % len(order)
        for name, n in order[shift:] + order[:shift]:
            seconds = (whole_cnnlab(args, runs, n, repeat) if name == "cnnlab train"
                       else whole_keras(args, npz, n, repeat))
            times.setdefault((name, n), []).append(seconds)
        print(f"whole process, repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {n} ep {v[-1]:.1f} s" for (name, n), v in sorted(times.items(), key=lambda kv: kv[0][1])),
            flush=True)
    print(f"\nwhole process (fresh process each, store existing, decode cache filled; "
          f"{args.repeats} repeats interleaved in rotating order)\n")
    print("| epochs | cnnlab train median s (min-max) | Keras program median s (min-max) | cnnlab / Keras |")
    print("|---|---|---|---|")
    for n in counts:
        ours = times[("cnnlab train", n)]
        cells = [f"{statistics.median(ours):.1f} ({min(ours):.1f}-{max(ours):.1f})"]
        if keras:
            theirs = times[("Keras program", n)]
            cells += [f"{statistics.median(theirs):.1f} ({min(theirs):.1f}-{max(theirs):.1f})",
                      f"{statistics.median(ours) / statistics.median(theirs):.3f}"]
        else:
            cells += ["(no runs/tfvenv)", "-"]
        print(f"| {n} | " + " | ".join(cells) + " |")


def one_round(measures: dict, repeat: int, repeats: int, times: dict, accuracy: dict) -> None:
    """Each contender once, appending its (seconds, accuracy). The order rotates each repeat, so no
    contender always runs first (right after another process freed the cores) or last."""
    names = list(measures)
    shift = repeat % len(names)
    for name in names[shift:] + names[:shift]:
        seconds, acc = measures[name]()
        times[name].append(seconds)
        accuracy[name].append(acc)
    print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
          flush=True)


def main() -> None:
    # The glibc malloc settings `cnnlab train` runs with (cnnlab/training/allocator.py), for every
    # contender alike: the hand loop and Keras run in this process or inherit its environment.
    restart_with_settings([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", default="1,3,5",
                        help="epoch counts for the whole-process comparison ('' to skip it)")
    parser.add_argument("--keras-python", default=str(REPO / "runs" / "tfvenv" / "bin" / "python"),
                        help="a python with tensorflow-cpu 2.21 (see benchmarks/keras_baseline.py); "
                             "the Keras row is skipped when it does not exist")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("cnnlab").setLevel(logging.WARNING)
    keras = Path(args.keras_python).is_file()
    print(machine() + "\n", flush=True)
    times: dict[str, list[float]] = {"cnnlab, tracking on": [], "cnnlab, tracking off": [],
                                     "hand-written loop": [], **({KERAS: []} if keras else {})}
    accuracy: dict[str, list[float]] = {name: [] for name in times}
    tmp = tempfile.TemporaryDirectory()
    runs = Path(tmp.name)
    npz = runs / "cifar10.npz"
    if keras:  # Keras trains on exactly cnnlab's decoded pixels
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "export_npz.py"), str(npz)], check=True,
                       capture_output=True, env=child_env())
    for repeat in range(args.repeats):
        measures = {"cnnlab, tracking on": partial(cnnlab_epoch, args, runs, True, repeat),
                    "cnnlab, tracking off": partial(cnnlab_epoch, args, runs, False, repeat),
                    "hand-written loop": partial(hand_loop_epoch, args, runs, repeat)}
        if keras:
            measures[KERAS] = partial(keras_epoch, args, npz, repeat)
        one_round(measures, repeat, args.repeats, times, accuracy)
    hand = statistics.median(times["hand-written loop"])
    on, off = statistics.median(times["cnnlab, tracking on"]), statistics.median(times["cnnlab, tracking off"])
    n = args.subset or 50_000
    print(f"\nbaseline, batch 32, {n} train + 10000 test images, torch threads {torch.get_num_threads()}, "
          f"last of {args.epochs} epochs per repeat, {args.repeats} repeats, interleaved in rotating order,\n"
          f"malloc: {in_effect()}\n")
    print(f"| {'what':<29} | median s/epoch | min-max s | ratio to hand loop | val acc (mean) |")
    print(f"|{'-' * 31}|----------------|-----------|--------------------|----------------|")
    for name, values in times.items():
        ratio = statistics.median(values) / hand
        print(f"| {name:<29} | {statistics.median(values):14.2f} | {min(values):.2f}-{max(values):.2f} "
              f"| {ratio:18.3f} | {statistics.mean(accuracy[name]):14.4f} |")
    print(f"\nframework overhead (cnnlab tracking off / hand loop): {off / hand:.3f}")
    print(f"tracking overhead (cnnlab tracking on / off):         {on / off:.3f}")
    if keras:
        print(f"cnnlab (tracking on) / Keras:                         "
              f"{on / statistics.median(times[KERAS]):.3f}")
    if args.whole.strip():
        print(flush=True)
        whole_process(args, runs, npz, keras)
    tmp.cleanup()


if __name__ == "__main__":
    main()
