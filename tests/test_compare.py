"""compare on hand-logged runs: each defect of the first version has a case here, and every
figure is recomputed with scipy/numpy/statsmodels, never with cnnlab's own helpers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats
from statsmodels.stats.multitest import multipletests

from cnnlab.cli import main as cli
from cnnlab.errors import ConfigError
from cnnlab.results.compare import compare

_clock = itertools.count(1_000)


def _store(tmp_path, name="e"):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment(name)


def _log(client, eid, seed, acc=None, *, status="FINISHED", test=None, layers="conv:6:5:same", params=None,
         tags=None, history=None, parent=None, architecture=True, validation="test"):
    """One run as cnnlab logs it: params (knobs, seed, architecture), metrics, status."""
    run = client.create_run(eid, start_time=next(_clock), tags={**(tags or {}), **(
        {"mlflow.parentRunId": parent} if parent else {})})
    p = {"seed": str(seed), "data.validation": validation, **(params or {})}
    if architecture:
        p.update({"model.layers_expanded": layers, "model.total_params": "100", "model.macs": "1000",
                  "model.receptive_field": "5"})
    metrics = []
    if acc is not None:
        metrics.append(Metric("val/acc_best", acc, 0, 5))
    if test is not None:
        metrics.append(Metric("test/acc", test, 0, 5))
    for step, value in enumerate(history or [], start=1):
        metrics.append(Metric("val/acc", value, 0, step))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in p.items()], metrics=metrics,
                     tags=[RunTag("seed", str(seed))])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _variant(client, eid, kernels, values, params=None, **kw):
    kw.setdefault("layers", f"conv:6:{kernels}:same")  # one network per kernels value
    return [_log(client, eid, seed, v, params={"model.kernels": kernels, **(params or {})}, **kw)
            for seed, v in enumerate(values)]


def test_a_failed_variant_is_never_the_reference(tmp_path):
    uri, client, eid = _store(tmp_path)
    for seed in range(3):  # [3, 3] sorts first, and every one of its runs failed
        _log(client, eid, seed, status="FAILED", params={"model.kernels": "[3,3]"}, architecture=False)
    _variant(client, eid, "[5]", [0.50, 0.52, 0.55])
    _variant(client, eid, "[7]", [0.53, 0.56, 0.57])
    result = compare(uri, experiment="e")
    assert result.order[0] == "kernels=[3, 3]" and result.reference == "kernels=[5]"
    assert [(p.a_label, p.b_label) for p in result.pairs] == [("kernels=[5]", "kernels=[3, 3]"),
                                                              ("kernels=[5]", "kernels=[7]")]
    assert any("cannot be the reference" in w for w in result.warnings)
    failed, made = result.pairs
    assert failed.method == "none" and "no test" in failed.notes[0]  # said, not dropped
    assert made.method == "paired t-test"
    assert made.p_value == pytest.approx(stats.ttest_rel([0.53, 0.56, 0.57], [0.50, 0.52, 0.55]).pvalue)


def test_n_counts_values_not_runs(tmp_path):
    uri, client, eid = _store(tmp_path)
    _variant(client, eid, "[5]", [0.5, 0.6, 0.7, None])  # the fourth run logged no value
    _variant(client, eid, "[3,3]", [0.5, 0.6, 0.7, 0.8])
    result = compare(uri, experiment="e")
    row = result.table.set_index("variant").loc["kernels=[5]"]
    assert row["n"] == 3 and row["val/acc_best mean"] == pytest.approx(0.6)
    low, high = stats.t.interval(0.95, 2, loc=0.6, scale=stats.sem([0.5, 0.6, 0.7]))
    assert (row["val/acc_best ci95 low"], row["val/acc_best ci95 high"]) == pytest.approx((low, high))
    assert not any("kernels=[5]: n = " in w for w in result.warnings)


def test_a_rerun_seed_is_one_replicate_the_latest(tmp_path):
    uri, client, eid = _store(tmp_path)
    _variant(client, eid, "[5]", [0.50, 0.55, 0.60])
    _log(client, eid, 0, 0.58, params={"model.kernels": "[5]"})  # seed 0 again, later
    _variant(client, eid, "[3,3]", [0.52, 0.57, 0.61])
    result = compare(uri, experiment="e")
    row = result.table.set_index("variant").loc["kernels=[5]"]
    assert row["n"] == 3 and row["val/acc_best mean"] == pytest.approx(np.mean([0.58, 0.55, 0.60]))
    assert any("seed(s) 0 ran more than once" in w for w in result.warnings)
    (pair,) = result.pairs
    assert pair.mean_diff == pytest.approx(np.mean(np.subtract([0.58, 0.55, 0.60], [0.52, 0.57, 0.61])))


def test_architecture_comes_from_any_run_that_logged_it(tmp_path):
    uri, client, eid = _store(tmp_path)
    _log(client, eid, 0, status="FAILED", params={"model.kernels": "[5]"}, architecture=False)
    _variant(client, eid, "[5]", [None, 0.5, 0.6])
    _variant(client, eid, "[3,3]", [0.5, 0.6, 0.7])
    table = compare(uri, experiment="e").table.set_index("variant")
    assert (table.loc["kernels=[5]", "params"], table.loc["kernels=[5]", "MACs"]) == (100, 1000)


def test_no_same_network_warning_on_a_kernels_by_lr_grid(tmp_path):
    uri, client, eid = _store(tmp_path)
    for kernels, layers in (("[5]", "conv:6:5:same"), ("[3,3]", "conv:6:3:same conv:6:3:same")):
        for lr in ("0.001", "0.01"):
            _variant(client, eid, kernels, [0.5, 0.6, 0.7], layers=layers, params={"optim.lr": lr})
    result = compare(uri, experiment="e")
    assert len(result.order) == 4
    assert not any("same network" in w for w in result.warnings)


def test_the_confound_warning_does_not_depend_on_how_compare_is_called(tmp_path):
    uri, client, eid = _store(tmp_path)
    parent = client.create_run(eid, tags={"sweep": "parent", "sweep.keys": "model.kernels,seed"}).info.run_id
    client.log_param(parent, "sweep.grid.model.kernels", "[5],[3,3]")
    for kernels, dropout in (("[5]", "0.2"), ("[3,3]", "0.5")):  # dropout changed with no override
        for seed in range(3):
            _log(client, eid, seed, 0.5 + 0.01 * seed, parent=parent, layers=f"{kernels} {dropout}",
                 params={"model.kernels": kernels, "model.dropout": dropout},
                 tags={"knob.model.kernels": kernels, "knob.seed": str(seed)})
    by_name = compare(uri, experiment="e").warnings
    by_parent = compare(uri, parent=parent).warnings
    for warnings in (by_name, by_parent):
        assert any("also differ in model.dropout" in w for w in warnings), warnings


def test_reproductions_and_audits_are_not_replicates(tmp_path):
    uri, client, eid = _store(tmp_path)
    _variant(client, eid, "[5]", [0.5, 0.6, 0.7])
    _variant(client, eid, "[3,3]", [0.5, 0.6, 0.8])
    _log(client, eid, 0, 0.9, params={"model.kernels": "[5]", "tracking.uri": "sqlite:///x.db"},
         tags={"reproduces": "abc"})
    _log(client, eid, 1, 0.9, params={"model.kernels": "[5]"}, tags={"audit": "audit-a"})
    result = compare(uri, experiment="e")
    assert result.order == ["kernels=[3, 3]", "kernels=[5]"]  # no tracking.uri variant
    assert result.table.set_index("variant").loc["kernels=[5]", "val/acc_best mean"] == pytest.approx(0.6)
    assert not any("same network" in w for w in result.warnings)
    assert any("2 run(s) made by `cnnlab reproduce` or `cnnlab audit` are left out" in n for n in result.notes)
    assert compare(uri, experiment="e", include_checks=True).table["n"].sum() == 6  # seeds, not runs


def test_the_plot_band_is_the_sample_std(tmp_path, monkeypatch):
    import matplotlib.axes

    uri, client, eid = _store(tmp_path)
    curves = [[0.3, 0.5], [0.4, 0.6], [0.2, 0.7]]
    for seed, curve in enumerate(curves):
        _log(client, eid, seed, max(curve), history=curve, params={"model.kernels": "[5]"})
        _log(client, eid, seed, max(curve), history=curve, params={"model.kernels": "[3,3]"})
    bands = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, low, high, **kw: bands.append(high))
    from cnnlab.results.plots import plot

    plot(compare(uri, experiment="e"), uri, tmp_path)
    values = np.array(curves)
    expected = values.mean(axis=0) + values.std(axis=0, ddof=1)
    assert len(bands) == 2 and np.allclose(bands[0], expected)


def test_seeds_that_do_not_pair_use_welch_and_n_of_one_says_why(tmp_path):
    uri, client, eid = _store(tmp_path)
    a, b = [0.50, 0.52, 0.55], [0.56, 0.58, 0.60]
    for seed, value in enumerate(a):
        _log(client, eid, seed, value, params={"model.kernels": "[5]"})
    for seed, value in enumerate(b, start=10):  # no shared seed
        _log(client, eid, seed, value, params={"model.kernels": "[3,3]"})
    _log(client, eid, 0, 0.5, params={"model.kernels": "[7]"})  # n = 1
    result = compare(uri, experiment="e", reference="kernels=[5]")
    welch, single = result.pairs
    scipy_welch = stats.ttest_ind(b, a, equal_var=False)
    assert welch.method == "Welch t-test" and welch.p_value == pytest.approx(scipy_welch.pvalue)
    ci = scipy_welch.confidence_interval(0.95)
    assert (welch.ci_low, welch.ci_high) == pytest.approx((ci.low, ci.high))
    assert "Welch's unpaired t-test was used" in welch.notes[0]
    assert single.method == "none" and "no test" in single.notes[0]
    text = "\n".join(result.pairs_text())
    assert "Welch's unpaired t-test was used" in text and "no test:" in text


def test_every_figure_of_three_comparisons_against_scipy_and_statsmodels(tmp_path):
    uri, client, eid = _store(tmp_path)
    rng = np.random.default_rng(3)
    base = rng.normal(0.55, 0.01, 6)
    variants = {"[5]": base, "[3,3]": base + rng.normal(0.004, 0.004, 6), "[7]": base + rng.normal(-0.003, 0.004, 6),
                "[9]": base + rng.normal(0.0, 0.004, 6)}
    for kernels, values in variants.items():
        _variant(client, eid, kernels, list(values), params={"ablation.control": "kernels=[5]"})
    result = compare(uri, experiment="e", effect=0.005)
    assert result.reference == "kernels=[5]"  # the preset's control, logged as a param
    raw = [stats.ttest_rel(variants[k], base).pvalue for k in ("[3,3]", "[7]", "[9]")]
    holm = multipletests(raw, method="holm")[1]
    for pair, p, adjusted, k in zip(result.pairs, raw, holm, ("[3,3]", "[7]", "[9]")):
        d = variants[k] - base
        assert pair.p_value == pytest.approx(p) and pair.p_holm == pytest.approx(adjusted)
        ci = stats.ttest_rel(variants[k], base).confidence_interval(0.95)
        assert (pair.ci_low, pair.ci_high) == pytest.approx((ci.low, ci.high))
        assert pair.d_z == pytest.approx(d.mean() / d.std(ddof=1))
        assert pair.improved == int((d > 0).sum())
        ci_improve = stats.binomtest(pair.improved, 6).proportion_ci(0.95, method="exact")
        assert (pair.p_improve_low, pair.p_improve_high) == pytest.approx((ci_improve.low, ci_improve.high))
        flips = np.array(list(itertools.product([-1, 1], repeat=6)))
        extreme = np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12
        assert pair.sign_flip_p == pytest.approx(extreme.mean())
    shown = "\n".join(result.pairs_text())
    assert "Holm-adjusted p: p = " in shown and "seeds needed: about" in shown


def test_all_pairs_and_an_explicit_reference(tmp_path):
    uri, client, eid = _store(tmp_path)
    for kernels, shift in (("[8]", 0.0), ("[16]", 0.01), ("[3,3,3]", 0.02), ("[3,3]", 0.03)):
        _variant(client, eid, kernels, [0.5 + shift, 0.51 + shift, 0.53 + shift])
    result = compare(uri, experiment="e")
    # Natural order: [3, 3] before [3, 3, 3], [8] before [16] (text order had it the other way).
    assert result.order == ["kernels=[3, 3]", "kernels=[3, 3, 3]", "kernels=[8]", "kernels=[16]"]
    assert compare(uri, experiment="e", reference="kernels=[16]").reference == "kernels=[16]"
    assert len(compare(uri, experiment="e", all_pairs=True).pairs) == 6
    with pytest.raises(ConfigError, match="matches no variant"):
        compare(uri, experiment="e", reference="kernels=[4]")


def test_test_set_selection_is_warned_and_a_split_makes_test_acc_the_headline(tmp_path):
    uri, client, eid = _store(tmp_path)
    _variant(client, eid, "[5]", [0.5, 0.6, 0.7], test=0.5)
    _variant(client, eid, "[3,3]", [0.5, 0.6, 0.8], test=0.5)
    result = compare(uri, experiment="e")
    assert result.metric == "val/acc_best" and any("selected on the test set" in w for w in result.warnings)
    uri2, client2, eid2 = _store(tmp_path / "split")
    for kernels in ("[5]", "[3,3]"):
        for seed in range(3):
            _log(client2, eid2, seed, 0.6, test=0.5 + 0.01 * seed, validation="split",
                 params={"model.kernels": kernels})
    result = compare(uri2, experiment="e")
    assert result.metric == "test/acc" and not any("selected on the test set" in w for w in result.warnings)


def test_accuracy_intervals_are_clipped_for_display_with_a_note(tmp_path):
    uri, client, eid = _store(tmp_path)
    _variant(client, eid, "[5]", [0.2, 0.99, 0.6])
    _variant(client, eid, "[3,3]", [0.5, 0.6, 0.7])
    result = compare(uri, experiment="e")
    row = result.table.set_index("variant").loc["kernels=[5]"]
    assert row["val/acc_best ci95 low"] < 0 and row["val/acc_best ci95 high"] > 1  # the raw interval
    shown = result.display().set_index("variant").loc["kernels=[5]", "val/acc_best 95% CI"]
    assert shown == "[0.0000, 1.0000]*" and any("clipped" in n for n in result.notes)


def test_the_cli_prints_the_new_figures_and_options(tmp_path, capsys):
    uri, client, eid = _store(tmp_path, "cli")
    _variant(client, eid, "[5]", [0.50, 0.52, 0.55])
    _variant(client, eid, "[3,3]", [0.53, 0.56, 0.57])
    assert cli(["compare", "--runs", str(tmp_path), "cli", "--reference", "kernels=[5]", "--effect", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "kernels=[3, 3] - kernels=[5] on val/acc_best" in out and "to detect 0.020 with 80% power" in out
    assert cli(["compare", "--runs", str(tmp_path), "cli", "--effect", "-1"]) == 2
    assert "--effect must be a number > 0" in capsys.readouterr().err
    assert not math.isnan(compare(uri, experiment="cli").pairs[0].p_value)
