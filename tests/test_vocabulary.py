"""One rule for "not what is trained": run names, the config hash, compare's knobs and Hydra's
exclude_keys all follow cnnlab.vocabulary, and the schema covers every YAML key."""

from __future__ import annotations

from omegaconf import OmegaConf

from cnnlab.config.compose import CONF_DIR, compose, config_hash, container, flatten
from cnnlab.config.schema import (
    DATA,
    GROUPS,
    MODEL_FAMILY,
    MODEL_LAYERS,
    MODEL_REGISTERED,
    MODEL_RESNET,
    MODEL_TORCHVISION,
    TOP,
)
from cnnlab.vocabulary import in_run_name, is_knob, is_trained


def _leaf_keys() -> set[str]:
    keys = set()
    for group in ("trainer", "tracking"):  # every option of the groups that hold excluded keys
        for path in (CONF_DIR / group).glob("*.yaml"):
            keys |= {f"{group}.{k}" for k in OmegaConf.load(path) if k != "defaults"}
    return keys | set(flatten(container(compose([]))))


def test_hydra_exclude_keys_are_exactly_the_keys_left_out_of_run_names():
    exclude = set(OmegaConf.load(CONF_DIR / "train.yaml").hydra.job.config.override_dirname.exclude_keys)
    assert exclude == {k for k in _leaf_keys() if not in_run_name(k)}


def test_one_rule_for_names_hash_and_knobs():
    assert not is_trained("trainer.threads") and not in_run_name("trainer.threads")  # they disagreed
    assert is_trained("trainer.max_epochs") and not in_run_name("trainer.max_epochs") and is_knob("trainer.max_epochs")
    assert not is_knob("tracking.uri") and not is_knob("seed") and not is_knob("model.macs")
    assert is_knob("model.kernels") and is_knob("optim.lr")
    base = config_hash(compose(["data=synthetic"]))
    assert config_hash(compose(["data=synthetic", "trainer.threads=1", "tracking.uri=sqlite:///x.db"])) == base
    assert config_hash(compose(["data=synthetic", "model.bn=false"])) != base


def test_the_schema_knows_every_key_the_yaml_files_define():
    for group, schema in GROUPS.items():
        for path in (CONF_DIR / group).glob("*.yaml"):
            keys = {k for k in OmegaConf.load(path) if k != "defaults"}
            assert keys <= set(schema.fields), (path.name, keys - set(schema.fields))
    assert set(DATA.fields["augment"].fields) == {"crop_padding", "hflip"}
    for path in (CONF_DIR / "model").glob("*.yaml"):
        keys = {k for k in OmegaConf.load(path) if k != "defaults"}
        assert any(keys <= set(group.fields) for group in (MODEL_FAMILY, MODEL_LAYERS, MODEL_RESNET,
                                                           MODEL_TORCHVISION, MODEL_REGISTERED)), path.name
    # ... and back: each of these groups' every field is in its YAML (the defaults' documentation)
    for name, group in (("resnet", MODEL_RESNET), ("torchvision", MODEL_TORCHVISION), ("registered", MODEL_REGISTERED)):
        assert set(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")) == set(group.fields), name
    top = OmegaConf.load(CONF_DIR / "train.yaml")
    assert {k for k in top if k not in ("defaults", "hydra")} == set(TOP) | set(GROUPS) - {
        "trainer", "optim", "data", "tracking"}
    for path in (CONF_DIR / "experiment").glob("*.yaml"):  # presets set only keys the schema knows
        preset = OmegaConf.to_container(OmegaConf.load(path))
        for group in set(preset) & set(GROUPS):
            assert set(preset[group]) <= set(GROUPS[group].fields), (path.name, group)
