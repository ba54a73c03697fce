"""Configuration: targets, the 45-experiment matrix, array indices, files, overrides, hashing, errors."""

from __future__ import annotations

import re

import pytest

from everest.config import (
    ConfigError,
    EverestConfig,
    Experiment,
    Target,
    all_targets,
    experiment_matrix,
    load_config,
    run_config,
)


@pytest.mark.parametrize("text", ["M5-72", "m5_72", "M5 72", "M5-72h", " M5-72 "])
def test_target_parses_spellings(text):
    assert Target.parse(text) == Target(flare_class="M5", horizon=72)
    assert str(Target.parse(text)) == "M5-72" and Target.parse(text).file_suffix == "M5_72"


@pytest.mark.parametrize("bad", ["X-12", "M-36", "C", "", "M5-72; rm -rf ~", "B-24", "M-24-1"])
def test_bad_target_lists_valid_values(bad):
    with pytest.raises(ConfigError) as err:
        Target.parse(bad)
    msg = str(err.value)
    assert repr(bad) in msg and "['C', 'M', 'M5']" in msg and "[24, 48, 72]" in msg and "M5-72" in msg


def test_matrix_and_array_index_follow_the_design_document():
    exps = experiment_matrix()
    assert len(exps) == 45 and [e.array_index for e in exps] == list(range(1, 46))
    assert [str(t) for t in all_targets()] == ["C-24", "C-48", "C-72", "M-24", "M-48", "M-72",
                                               "M5-24", "M5-48", "M5-72"]
    # design document: 1-5 C-24 seeds 0-4, 16-20 M-24, 41-45 M5-72
    assert Experiment.from_array_index(1).name == "everest_C_24h_seed0"
    assert Experiment.from_array_index(5).name == "everest_C_24h_seed4"
    assert Experiment.from_array_index(16).name == "everest_M_24h_seed0"
    assert Experiment.from_array_index(23).name == "everest_M_48h_seed2"
    assert Experiment.from_array_index(45).name == "everest_M5_72h_seed4"
    for k in range(1, 46):
        assert Experiment.from_array_index(k).array_index == k
    for bad in (0, 46, -1, "3"):
        with pytest.raises(ConfigError, match="1..45"):
            Experiment.from_array_index(bad)


def test_matrix_subset_and_validation():
    exps = experiment_matrix(["M-48", "C-24"], [1, 0])
    assert [e.name for e in exps] == ["everest_C_24h_seed1", "everest_C_24h_seed0",
                                      "everest_M_48h_seed1", "everest_M_48h_seed0"]
    with pytest.raises(ConfigError, match="empty target list"):
        experiment_matrix([], [0])
    with pytest.raises(ConfigError, match="duplicate targets"):
        experiment_matrix(["C-24", "C_24"], [0])
    for seeds in ([0, 0], [-1]):
        with pytest.raises(ConfigError, match="distinct non-negative"):
            experiment_matrix(["C-24"], seeds)


def test_defaults_are_the_design_documents():
    c = EverestConfig()
    assert (c.train.epochs, c.train.batch_size, c.train.learning_rate, c.train.early_stopping_patience) == \
        (120, 512, 5.34e-4, 10)
    assert c.loss.focal_gamma_max == 2.803 and c.train.use_amp
    assert (c.threshold.points, c.threshold.start, c.threshold.stop, c.threshold.source) == (81, 0.1, 0.9, "validation")
    assert c.threshold.weights == {"tss": 0.4, "f1": 0.2, "precision": 0.15, "recall": 0.15, "specificity": 0.1}
    assert c.seeds == (0, 1, 2, 3, 4)
    assert [(p.start_epoch, p.focal, p.evt) for p in c.loss.schedule] == [(0, 0.9, 0.0), (20, 0.8, 0.1), (40, 0.7, 0.2)]
    assert c.loss.weights_at(19).evt == 0.0 and c.loss.weights_at(20).evt == 0.1 and c.loss.weights_at(119).evt == 0.2
    assert c.loss.gamma_at(25) == pytest.approx(2.803 / 2) and c.loss.gamma_at(80) == 2.803


def test_file_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nepochs = 7\nbatch_size = 64\n[threshold]\nsource = 'test'\n")
    cfg = load_config(toml, ["train.epochs=3", "model.use_evt=false", "data.features=[USFLUX, R_VALUE]"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.threshold.source) == (3, 64, "test")
    assert cfg.model.use_evt is False and cfg.data.features == ("USFLUX", "R_VALUE")
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  epochs: 7\n  batch_size: 64\nthreshold:\n  source: test\n")
    assert load_config(yml, {"train.epochs": 3, "model.use_evt": False,
                             "data.features": ["USFLUX", "R_VALUE"]}) == cfg


def test_hash_is_stable_and_sensitive():
    a, b = EverestConfig(), load_config(None)
    assert a.config_hash() == b.config_hash() and len(a.config_hash()) == 16
    assert a.with_overrides(["train.epochs=3"]).config_hash() != a.config_hash()
    assert a.with_overrides(["train.epochs=120"]).config_hash() == a.config_hash()


def test_run_control_settings_leave_the_hash_unchanged():
    """Where and how a run executes does not change its result: finished results and checkpoints stay valid."""
    a = EverestConfig()
    run_control = ["train.device=cpu", "train.num_threads=3", "train.eval_batch_size=64",
                   "train.time_limit_minutes=30", "data.cache=false"]
    assert a.with_overrides(run_control).config_hash() == a.config_hash()
    for science in ("train.learning_rate=0.001", "train.use_amp=false", "train.cuda_graphs=false",
                    "model.dropout=0.1", "threshold.source=test", "data.augment_copies=2"):
        assert a.with_overrides([*run_control, science]).config_hash() != a.config_hash(), science


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.epochs=0"], "train.epochs"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.device=tpu"], "train.device"),
        (["train.bogus=1"], "unknown configuration key 'train.bogus'"),
        (["nope.x=1"], "'nope' is not a section"),
        (["train.epochs"], "expected KEY=VALUE"),
        (["model.num_heads=3"], "divisible"),
        (["threshold.start=0.8", "threshold.stop=0.2"], "threshold.stop"),
        (["threshold.weights={auc: 1}"], "unknown metrics"),
        (["seeds=[0, 0]"], "distinct"),
        (["data.augment_classes=[X]"], "unknown classes"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        EverestConfig().with_overrides(overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("training:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="training"):
        load_config(unknown)


def test_config_files_refuse_duplicate_keys_like_profiles(tmp_path):
    """A repeated key is an error naming it (YAML would silently keep the last; TOML refuses by its spec)."""
    dup_yaml = tmp_path / "dup.yaml"
    dup_yaml.write_text("train:\n  epochs: 3\n  batch_size: 64\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"cannot parse configuration file .*dup.yaml.*duplicate keys \['epochs'\]"):
        load_config(dup_yaml)
    dup_toml = tmp_path / "dup.toml"
    dup_toml.write_text("[train]\nepochs = 3\nepochs = 5\n")
    with pytest.raises(ConfigError, match=r"cannot parse configuration file .*dup.toml"):
        load_config(dup_toml)


def test_run_options_make_one_config():
    """--epochs and --device are shorthands applied after the preset and the overrides."""
    cfg = run_config(None, ["train.epochs=7", "train.batch_size=64"], preset="demo", epochs=3, device="cpu")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.device) == (3, 64, "cpu")
    assert cfg.train.early_stopping_patience == 2  # from the demo preset
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match="invalid --epochs"):
            run_config(epochs=bad)


def test_presets_cap_the_budget_and_files_still_win(tmp_path):
    from everest.config import PRESETS

    demo = load_config(preset="demo")
    assert (demo.train.epochs, demo.train.early_stopping_patience, demo.train.batch_size) == (6, 2, 256)
    assert demo.train.learning_rate == 5.34e-4 and demo.model == EverestConfig().model  # same recipe otherwise
    assert load_config(preset="production") == EverestConfig() and PRESETS["production"] == ()
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 5\n[threshold.weights]\ntss = 1.0\n")
    cfg = load_config(f, ["train.batch_size=64"], preset="demo")
    assert (cfg.train.epochs, cfg.train.early_stopping_patience, cfg.train.batch_size) == (5, 2, 64)
    assert cfg.threshold.weights == {"tss": 1.0}  # a mapping value is replaced whole, not merged
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_config(preset="fast")


@pytest.mark.parametrize(("overrides", "epochs", "fragment"), [
    (["train.epochs=abc"], 1, "invalid override train.epochs='abc': Input should be a valid integer"),
    (["train.batch_size=0", "train.batch_size=4"], None, "invalid override train.batch_size=0"),
    (["data.validation_fraction=2", "data.validation_fraction=0.3"], None, "data.validation_fraction=2"),
])
def test_every_override_is_checked_as_given_even_when_a_later_one_replaces_it(overrides, epochs, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        run_config(None, overrides, epochs=epochs)
    assert run_config(None, ["model.embed_dim=16", "model.num_heads=2"]).model.num_heads == 2  # pairs still work
