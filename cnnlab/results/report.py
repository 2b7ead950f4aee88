"""One ablation -> report.md, report.html (self-contained) and table.tex.

Every number comes from `cnnlab.results.compare.compare` (the table, the paired
comparisons, the warnings, the plots) or is read from MLflow as logged (the
expanded layer lists, provenance tags): nothing is recomputed here, so the
report cannot disagree with `cnnlab compare`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from cnnlab.results.compare import Comparison, compare
from cnnlab.results.plots import plot
from cnnlab.tracking.reader import Reader

PROVENANCE_TAGS = ("mlflow.source.git.commit", "git.dirty", "version.torch", "version.lightning",
                   "version.mlflow", "host")
PLOTS = {"val_acc_per_epoch.png": "Validation accuracy per epoch (mean and std band over seeds)",
         "accuracy_vs_macs.png": "Accuracy vs MACs (mean and std over seeds)"}
CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}code{font-size:0.9em}img{max-width:100%}.warn{color:#a40}"""
MISSING = "--"


def write_report(uri: str, experiment: str | None = None, parent: str | None = None, *, out: Path,
                 metric: str | None = None, **options) -> dict[str, Path]:
    """Write the report of an experiment or a sweep's parent run into `out`; return the files by name.

    `metric` and `options` (reference, all_pairs, effect, include_checks) are compare's. With
    `parent`, the files are also logged to that run under `report/`.
    """
    result = compare(uri, experiment=experiment, parent=parent, metric=metric, **options)  # ConfigError on bad input
    reader = Reader(uri)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    question = _question(reader, result, experiment, parent)
    runs = {run_id: reader.run(run_id) for run_id in result.runs["run_id"]}
    architecture = _architecture(result, runs)
    provenance, summary = _provenance(result, runs)
    images = plot(result, uri, out)

    paths = {"report.md": out / "report.md", "report.html": out / "report.html", "table.tex": out / "table.tex"}
    paths["report.md"].write_text(_markdown(question, architecture, result, provenance, summary))
    paths["report.html"].write_text(_html(question, architecture, result, provenance, summary, images))
    paths["table.tex"].write_text(result.latex())
    paths.update({image.name: image for image in images})
    if parent:
        for path in paths.values():
            reader.attach(parent, path, "report")
    return paths


def _question(reader: Reader, result: Comparison, experiment: str | None, parent: str | None) -> list[tuple[str, str]]:
    """(label, value) lines: what was asked and which knobs answer it."""
    if parent:
        run = reader.run(parent)
        name = reader.experiment_name(run.info.experiment_id)
        lines = [("Experiment", name), ("Sweep parent run", parent),
                 ("Swept knobs (sweep.keys)", run.data.tags.get("sweep.keys") or "(none recorded)")]
    else:
        lines = [("Experiment", str(experiment))]
    lines.append(("Knobs that vary between runs", ", ".join(result.knobs) or "(none: one variant)"))
    lines.append(("Compared metric", result.metric))
    lines.append(("Reference variant", result.reference or "(none)"))
    return lines


def _architecture(result: Comparison, runs: dict) -> pd.DataFrame:
    """Per variant: compare's params / MACs / RF, and the layer list one of its runs logged."""
    shown = result.display().set_index("variant")
    rows = []
    for variant in result.order:
        group = result.runs[result.runs["variant"] == variant]
        # Prefer a finished run: a run that failed before training may lack the param.
        ordered = sorted(group["run_id"], key=lambda r: runs[r].info.status != "FINISHED")
        source = next((r for r in ordered if "model.layers_expanded" in runs[r].data.params), None)
        rows.append({"variant": variant, "params": shown.loc[variant, "params"],
                     "MACs": shown.loc[variant, "MACs"], "RF": shown.loc[variant, "RF"],
                     "layers (model.layers_expanded)":
                         runs[source].data.params["model.layers_expanded"] if source else MISSING,
                     "from run": source or MISSING})
    return pd.DataFrame(rows)


def _provenance(result: Comparison, runs: dict) -> tuple[pd.DataFrame, list[str]]:
    """One row per run, and lines saying whether the runs share one commit and one data fingerprint."""
    rows = []
    for _, row in result.runs.sort_values(["variant", "seed"]).iterrows():
        run = runs[row["run_id"]]
        rows.append({"run id": row["run_id"], "variant": row["variant"], "status": run.info.status,
                     "seed": MISSING if pd.isna(row["seed"]) else str(row["seed"]),
                     **{tag: run.data.tags.get(tag, MISSING) for tag in PROVENANCE_TAGS},
                     "data.fingerprint": run.data.params.get("data.fingerprint", MISSING)})
    table = pd.DataFrame(rows)
    summary = [_shared(table, "mlflow.source.git.commit", "commit"),
               _shared(table, "data.fingerprint", "data fingerprint") + _per_seed(table)]
    dirty = int((table["git.dirty"] == "true").sum())
    if dirty:
        summary.append(f"{dirty} of {len(table)} runs ran on a dirty checkout (uncommitted changes): "
                       f"their commit does not fully describe their code.")
    return table, summary


def _shared(table: pd.DataFrame, column: str, what: str) -> str:
    # Runs that failed before they started (no provenance logged) neither agree nor disagree.
    known = table.loc[table[column] != MISSING, column]
    unknown = len(table) - len(known)
    note = f" ({unknown} run(s) did not record one)" if unknown else ""
    counts = known.value_counts()
    if len(counts) == 0:
        return f"No run recorded a {what}."
    if len(counts) == 1:
        return f"All {len(known)} runs that recorded a {what} share one {what}: {counts.index[0]}{note}."
    # Most common first, ties by value: the same runs always give the same line.
    spread = ", ".join(f"{value} ({n} runs)" for value, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))
    return f"The runs do not share one {what}: {spread}{note}."


def _per_seed(table: pd.DataFrame) -> str:
    """Data made from the seed (synthetic, seeded splits) differs between seeds by design; what a
    paired comparison needs is that runs with the same seed saw the same data."""
    known = table[table["data.fingerprint"] != MISSING]
    if known["data.fingerprint"].nunique() < 2:
        return ""
    if (known.groupby("seed")["data.fingerprint"].nunique() == 1).all():
        return (" Runs with the same seed share one: the data depends on the seed, and the paired"
                " comparisons see the same data.")
    return " Runs with the same seed saw different data: the paired comparisons are not controlled."


def _notes(result: Comparison) -> list[str]:
    """The paired comparisons and warnings, worded as `compare` words them."""
    return result.lines()


# --- Markdown -------------------------------------------------------------------------------------

def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    rows = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(_md_cell(row[c]) for c in cols) + " |" for _, row in table.iterrows()]
    return "\n".join(rows)


def _markdown(question, architecture: pd.DataFrame, result: Comparison, provenance: pd.DataFrame,
              summary: list[str]) -> str:
    title = question[0][1]
    parts = [f"# Report: {title}", "", "## Question", "",
             *(f"- {label}: {_md_cell(value)}" for label, value in question), "",
             "## Architectures", "", _md_table(architecture), "",
             "## Results", "", result.markdown().rstrip("\n"), "",
             "## Curves", "", *(f"![{caption}]({name})\n" for name, caption in PLOTS.items()),
             "## Provenance", "", *(f"- {line}" for line in summary), "", _md_table(provenance), "",
             "The LaTeX table (booktabs) is in `table.tex`.", ""]
    return "\n".join(parts)


# --- HTML -----------------------------------------------------------------------------------------

def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(row[c])}</td>" for c in table.columns) + "</tr>"
                   for _, row in table.iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    """Plots inline as base64 PNG: the file opens anywhere, with no assets beside it."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(question, architecture: pd.DataFrame, result: Comparison, provenance: pd.DataFrame,
          summary: list[str], images: list[Path]) -> str:
    title = f"Report: {question[0][1]}"
    notes = _notes(result)
    warnings = [n for n in notes if n.startswith("warning: ")]
    pairs = [n for n in notes if not n.startswith("warning: ")]
    figures = "".join(
        f'<figure><img alt="{_esc(PLOTS.get(p.name, p.name))}" src="{_data_uri(p)}">'
        f"<figcaption>{_esc(PLOTS.get(p.name, p.name))}</figcaption></figure>" for p in images)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
        "<h2>Question</h2><ul>" + "".join(f"<li>{_esc(label)}: <code>{_esc(value)}</code></li>"
                                          for label, value in question) + "</ul>",
        "<h2>Architectures</h2>", _html_table(architecture),
        "<h2>Results</h2>", _html_table(result.display()),
        _html_table(result.comparisons_table()) if result.pairs else "",
        "<ul>" + "".join(f"<li>{_esc(p)}</li>" for p in pairs) + "</ul>" if pairs else "",
        "<ul>" + "".join(f'<li class="warn">{_esc(w)}</li>' for w in warnings) + "</ul>" if warnings else "",
        "<h2>Curves</h2>", figures,
        "<h2>Provenance</h2><ul>" + "".join(f"<li>{_esc(s)}</li>" for s in summary) + "</ul>",
        _html_table(provenance),
        "<p>The LaTeX table (booktabs) is in <code>table.tex</code>.</p>",
        "</body></html>", ""])
