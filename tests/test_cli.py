"""`cnnlab summary`: the table, its JSON, and one clear error line for bad input."""

import json
import subprocess
import sys

import pytest

from cnnlab.cli import main


def test_summary_table_shows_the_chapter_numbers(capsys):
    assert main(["summary", "model=baseline"]) == 0
    out = capsys.readouterr().out
    assert "16x16x6" in out
    for figure in ("456", "196,736", "1,290", "Total params: 198,506",
                   "Trainable params: 198,494", "Non-trainable params: 12"):
        assert figure in out
    # The family's expansion is visible.
    assert "Layers: [conv:6:5:same, bn, relu, maxpool:2:same, dropout:0.2" in out


def test_summary_json_carries_the_same_numbers(capsys):
    assert main(["summary", "--json", "model.kernels=[3,3]"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"][:6] == ["conv:6:3:same", "bn", "relu", "conv:6:3:same", "bn", "relu"]
    assert data["receptive_field"]["size"] == [6, 6]  # two 3x3 (5) then a 2x2 pool
    assert data["total_params"] == data["trainable_params"] + data["non_trainable_params"]
    assert data["macs"] == sum(layer["macs"] for layer in data["layers"])


@pytest.mark.parametrize("overrides, fragment", [
    (["model=densenet"], "Could not find 'model/densenet'"),
    (["model=custom", "model.layers=[conv:6:5,flatten,dense:10,pool]"], "unknown layer 'pool'"),
    (["model=custom", "model.layers=[conv:0:5,flatten,dense:10]"], "filters must be a positive integer, got 0"),
    (["model=custom", "model.layers=[conv:6:5:s-1,flatten,dense:10]"], "unknown option 's-1'"),
    (["model.dropout=1.0"], "model.dropout must be a number in [0, 1), got 1.0"),
    (["model.padding=full"], "model.padding must be one of same, valid, got 'full'"),
    (["model.layers=[conv:6:5]"], "Could not override 'model.layers'"),
    (["model=custom", "model.layers=[conv:6:5,,relu]"], "cannot parse the override 'model.layers=[conv:6:5,,relu]'"),
    (["model=lenet"], "layer 5 (maxpool 2x2, valid) needs at least 2x2 input, got 1x1"),
    (["model=custom", "model.layers=[conv:6:5:same,dense:10]"], "needs a flat input"),
])
def test_bad_input_is_one_clear_error(capsys, overrides, fragment):
    assert main(["summary", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert fragment in err
    assert "Traceback" not in err


def test_console_script_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "cnnlab.cli", "summary", "model=vgg"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "Total params:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cnnlab.cli", "summary", "model=lenet"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: layer 5 (maxpool 2x2, valid) needs at least 2x2 input, got 1x1"
