"""``everest-tune``: region folds, the search space, the objective (which never reads a test file), the tuned
recipe, and the flow against a real Prefect server (study continued, crashed trials retried, CLI, deployments).

The end-to-end runs use the tiny model, 1-2 epochs, 2 folds of one target and a 2-worker LocalCluster.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from profiles_for_tests import for_test_machine
from tiny import overrides

from everest.config import EverestConfig, Target, TuningRecord, load_config
from everest.data.samples import SampleSet, region_folds
from everest.errors import ConfigError, DataError
from everest.training import tuning

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SPACE = ROOT / "deployments" / "tuning" / "search_space.yaml"
TINY = overrides("train.num_threads=1")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------------------------- region folds


def _samples(regions: list[int], flaring: set[int], per_region: int = 3) -> SampleSet:
    """``per_region`` samples of each region; the regions in ``flaring`` have one positive each."""
    region = np.repeat(np.array(regions, dtype=np.int64), per_region)
    y = np.zeros(len(region), np.int8)
    for r in flaring:
        y[np.flatnonzero(region == r)[0]] = 1
    n = len(region)
    return SampleSet(x=np.zeros((n, 2, 1), np.float32), valid=np.ones((n, 2), bool), y=y, region=region,
                     row=np.arange(n, dtype=np.int64), time=np.arange(n).astype("datetime64[s]"))


def _val_regions(folds: list[tuple[SampleSet, SampleSet]]) -> list[frozenset[int]]:
    return [frozenset(np.unique(val.region).tolist()) for _, val in folds]


@pytest.mark.parametrize(("n_regions", "n_flaring", "k"), [(10, 3, 3), (7, 2, 2), (12, 5, 4), (5, 5, 5)])
def test_region_folds_partition_the_regions_and_every_validation_sees_flares(n_regions, n_flaring, k):
    regions = list(range(100, 100 + n_regions))
    flaring = set(regions[-n_flaring:])  # the last regions flare: a plain round-robin would bunch them
    samples = _samples(regions, flaring)
    folds = region_folds(samples, k, seed=0)
    assert len(folds) == k
    seen: list[int] = []
    for train, val in folds:
        train_regions, val_regions = set(train.region.tolist()), set(val.region.tolist())
        assert train_regions.isdisjoint(val_regions)
        assert train_regions | val_regions == set(regions)  # nothing lost: the rest of the regions train
        assert len(train) + len(val) == len(samples)
        assert val.n_positive >= 1 and train.n_positive == len(flaring) - val.n_positive
        # a region's samples all go to one side
        assert len(val) == 3 * len(val_regions)
        seen += sorted(val_regions)
    assert sorted(seen) == regions  # every region is validation in exactly one fold
    sizes = [len(v) for v in _val_regions(folds)]
    assert max(sizes) - min(sizes) <= 1  # dealt evenly


def test_region_folds_on_the_tiny_training_table(tiny_data):
    from everest.data.samples import load_samples

    target = Target.parse("M5-72")  # the rarest target of the tiny tables: 7 flaring regions of 80
    samples, _ = load_samples(tiny_data / "training_data_M5_72.csv", target, EverestConfig().data, 10)
    flaring = np.unique(samples.region[samples.y == 1])
    assert len(flaring) >= 5
    folds = region_folds(samples, 5, seed=3)
    assert all(val.n_positive > 0 for _, val in folds)
    assert sorted(r for v in _val_regions(folds) for r in v) == sorted(np.unique(samples.region).tolist())


def test_region_folds_are_deterministic_for_a_seed():
    samples = _samples(list(range(30)), {1, 5, 9, 13, 22})
    first = _val_regions(region_folds(samples, 3, seed=7))
    assert _val_regions(region_folds(samples, 3, seed=7)) == first
    for a, b in zip(region_folds(samples, 3, seed=7), region_folds(samples, 3, seed=7), strict=True):
        assert np.array_equal(a[0].row, b[0].row) and np.array_equal(a[1].row, b[1].row)
    others = {tuple(_val_regions(region_folds(samples, 3, seed=s))) for s in range(1, 6)}
    assert others - {tuple(first)}  # the seed does shuffle the regions


@pytest.mark.parametrize(("n_regions", "k"), [(5, 1), (5, 0), (3, 4), (1, 2)])
def test_region_folds_refuse_too_few_regions_or_folds(n_regions, k):
    samples = _samples(list(range(n_regions)), {0})
    with pytest.raises(DataError, match=rf"cannot make {k} region-disjoint folds of {n_regions} region"):
        region_folds(samples, k, seed=0)


# --------------------------------------------------------------------------------------------- search space


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_search_space_loads_and_its_bounds_make_valid_configurations():
    space = tuning.load_search_space(SHIPPED_SPACE, EverestConfig())
    assert {"train.learning_rate", "loss.schedule", "train.epochs", "model.dropout"} <= set(space.params)
    assert space.params["train.learning_rate"].log and space.params["train.learning_rate"].kind == "float"
    assert space.params["train.epochs"].kind == "int"
    assert space.params["loss.schedule"].kind == "categorical"
    for choice in space.params["loss.schedule"].choices:
        EverestConfig().with_overrides({"loss.schedule": choice})
    # also against the demo preset and the tiny model the tests use
    tuning.load_search_space(SHIPPED_SPACE, load_config(preset="demo", overrides=list(TINY)))


BAD_SPACE = """\
train.no_such: {low: 1, high: 2}
train.learning_rate: {low: 0.01, high: 0.001}
train.weight_decay: {low: 0.0, high: 0.01, log: true}
model.dropout: {low: 0.0, high: 1.5}
train.batch_size: {choices: []}
loss.focal_gamma_max: {choices: [1.0, 2.0], low: 0.0, high: 3.0}
"""
BAD_SPACE_FRAGMENTS = ("train.no_such", "unknown configuration key", "train.learning_rate", "must be below high",
                       "train.weight_decay", "log range needs low > 0", "model.dropout", "1.5",
                       "train.batch_size", "choices is empty", "loss.focal_gamma_max", "not both")


def test_search_space_with_many_problems_names_every_one_in_one_error(tmp_path):
    path = _write(tmp_path / "bad.yaml", BAD_SPACE)
    with pytest.raises(ConfigError) as info:
        tuning.load_search_space(path, EverestConfig())
    message = str(info.value)
    assert "6 problem(s)" in message
    for fragment in BAD_SPACE_FRAGMENTS:
        assert fragment in message, (fragment, message)


def test_unknown_spec_key_is_reported_together_with_the_other_problems(tmp_path):
    path = _write(tmp_path / "bad.yaml", BAD_SPACE + "train.epochs: {low: 1, high: 3, step: 1}\n")
    with pytest.raises(ConfigError) as info:
        tuning.load_search_space(path, EverestConfig())
    message = str(info.value)
    assert "7 problem(s)" in message
    for fragment in (*BAD_SPACE_FRAGMENTS, "train.epochs", "step"):
        assert fragment in message, (fragment, message)


def test_unknown_spec_key_alone_is_refused(tmp_path):
    path = _write(tmp_path / "bad.yaml", "train.epochs: {low: 1, high: 3, step: 1}\n")
    with pytest.raises(ConfigError, match=r"train\.epochs.*step.*unknown key"):
        tuning.load_search_space(path, EverestConfig())


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_search_space_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="names no parameter"):
        tuning.load_search_space(_write(tmp_path / "empty.yaml", text), EverestConfig())


def test_integer_range_needs_whole_bounds_and_missing_bounds_are_named(tmp_path):
    path = _write(tmp_path / "s.yaml", "train.epochs: {low: 1.5, high: 3, integer: true}\nmodel.dropout: {low: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        tuning.load_search_space(path, EverestConfig())
    assert "train.epochs: an integer range needs whole-number bounds" in str(info.value)
    assert "model.dropout: give low and high" in str(info.value)


def test_space_hash_follows_the_ranges_not_the_key_order(tmp_path):
    base = EverestConfig()
    a = tuning.load_search_space(_write(tmp_path / "a.yaml", "train.learning_rate: {low: 1.0e-4, high: 1.0e-2, "
                                        "log: true}\nmodel.dropout: {low: 0.0, high: 0.5}\n"), base)
    b = tuning.load_search_space(_write(tmp_path / "b.yaml", "model.dropout: {high: 0.5, low: 0.0}\n"
                                        "train.learning_rate: {log: true, high: 1.0e-2, low: 1.0e-4}\n"), base)
    c = tuning.load_search_space(_write(tmp_path / "c.yaml", "train.learning_rate: {low: 1.0e-4, high: 1.0e-2, "
                                        "log: true}\nmodel.dropout: {low: 0.0, high: 0.4}\n"), base)
    d = tuning.load_search_space(_write(tmp_path / "d.yaml", "train.learning_rate: {low: 1.0e-4, high: 1.0e-2}\n"
                                        "model.dropout: {low: 0.0, high: 0.5}\n"), base)
    assert a.space_hash() == b.space_hash()
    assert len({a.space_hash(), c.space_hash(), d.space_hash()}) == 3
    assert len(a.space_hash()) == 16 and int(a.space_hash(), 16) >= 0


# --------------------------------------------------------------------------------------------- suggest


def test_suggest_stays_in_bounds_and_overrides_of_gives_back_the_drawn_values(tmp_path):
    extra = _write(tmp_path / "extra.yaml", "train.batch_size: {low: 16, high: 1024, integer: true, log: true}\n"
                   "calibration.method: {choices: [none, platt, isotonic]}\n")
    base = EverestConfig()
    shipped = tuning.load_search_space(SHIPPED_SPACE, base)
    space = tuning.SearchSpace(params={**shipped.params, **tuning.load_search_space(extra, base).params})
    schedules = [list(c) for c in space.params["loss.schedule"].choices]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10))
    drawn = []
    for _ in range(40):
        trial = study.ask()
        values = tuning.suggest(trial, space)
        assert set(values) == set(space.params)
        for key, spec in space.params.items():
            value = values[key]
            if spec.kind == "categorical":
                assert value in list(spec.choices), (key, value)
            else:
                assert spec.low <= value <= spec.high, (key, value)
                assert isinstance(value, int) if spec.kind == "int" else isinstance(value, float)
        assert values["loss.schedule"] in schedules and isinstance(values["loss.schedule"], list)
        assert isinstance(trial.params["loss.schedule"], int)  # stored by position
        assert tuning.overrides_of(trial.params, space) == values
        base.with_overrides(values)  # every draw is a valid configuration
        study.tell(trial, -values["train.learning_rate"] + 0.01 * values["train.epochs"])
        drawn.append(values)
    # what the study stores (the storage's copy) maps back to the same overrides
    for frozen, values in zip(study.trials, drawn, strict=True):
        assert tuning.overrides_of(frozen.params, space) == values
    used = {schedules.index(v["loss.schedule"]) for v in drawn}
    assert used == set(range(len(schedules)))
    lrs = [v["train.learning_rate"] for v in drawn]
    assert min(lrs) < 5e-4 < max(lrs)  # spread over the log range, not stuck at a bound
    best = tuning.overrides_of(study.best_trial.params, space)
    assert best in drawn


# --------------------------------------------------------------------------------------------- test period


_RECORD_OPENS = False  # the audit hook below records only while this is True (hooks cannot be removed)
_OPENED: list[str] = []
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if _RECORD_OPENS and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


def _record_opens(on: bool) -> None:
    global _RECORD_OPENS, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _RECORD_OPENS = on


def test_cross_validate_never_reads_the_test_period(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    # on the CPU with one thread, so the two runs below must agree to the last digits
    config = EverestConfig().with_overrides(overrides("train.num_threads=1", "train.epochs=1", "train.device=cpu"))
    targets = [Target.parse("M-24")]

    # (a) every file opened while cross-validating: the training table, never a testing table
    _OPENED.clear()
    _record_opens(True)
    try:
        first = tuning.cross_validate(config, targets, data, tmp_path / "work-a", folds=2, seed=0)
    finally:
        _record_opens(False)
    assert any("training_data_M_24" in p for p in _OPENED), _OPENED
    assert not [p for p in _OPENED if "testing_data_" in p]
    assert math.isfinite(first) and -1.0 <= first <= 1.0
    assert not any((tmp_path / "work-a").glob("*fold*"))  # a fold's checkpoint folder is removed when done

    # (b) with every testing table deleted the objective still runs, and gives the same score
    for path in data.glob("testing_data_*.csv"):
        path.unlink()
    assert not list(data.glob("testing_data_*"))
    steps: list[tuple[int, float]] = []
    second = tuning.cross_validate(config, targets, data, tmp_path / "work-b", folds=2, seed=0,
                                   report=lambda step, value: steps.append((step, value)) or False)
    assert second == pytest.approx(first, abs=1e-6)
    assert [s for s, _ in steps] == [1, 2]  # one epoch x two folds, counted across folds
    assert second == pytest.approx(sum(v for _, v in steps) / 2)


def test_cross_validate_prunes_when_told_and_refuses_an_unknown_metric(tiny_data, tmp_path):
    config = EverestConfig().with_overrides(overrides("train.num_threads=1", "train.epochs=1"))
    with pytest.raises(ConfigError, match="unknown tuning metric 'val_f1'"):
        tuning.cross_validate(config, [Target.parse("M-24")], tiny_data, tmp_path, folds=2, metric="val_f1")
    with pytest.raises(tuning.Pruned, match="pruned at step 1"):
        tuning.cross_validate(config, [Target.parse("M-24")], tiny_data, tmp_path, folds=2,
                              report=lambda step, value: True)


# --------------------------------------------------------------------------------------------- the recipe


def _record(**changes) -> TuningRecord:
    return TuningRecord(**{"study": "s1", "storage": "sqlite:////tmp/study.db", "targets": ("M-24", "C-48"),
                           "metric": "val_tss", "folds": 3, "trials": 12, "best_trial": 7, "best_value": 0.61,
                           "space_hash": "0123456789abcdef"} | changes)


def test_write_recipe_loads_back_as_the_tuned_configuration(tmp_path):
    base = load_config(overrides=list(TINY))
    schedule = [{"start_epoch": 0, "focal": 1.0, "evidential": 0.0, "evt": 0.0, "precursor": 0.0}]
    params = {"train.learning_rate": 1.234e-3, "train.epochs": 7, "train.batch_size": 128, "model.dropout": 0.31,
              "loss.schedule": schedule}
    record = _record()
    path = tuning.write_recipe(tmp_path / "tuned_config.yaml", base, params, record)
    assert path.read_text().startswith("# EVEREST recipe tuned on validation folds by study 's1'")

    expected = base.with_overrides(params)
    for preset in ("production", "demo"):  # the file is the whole configuration: no preset changes it
        loaded = load_config(path, preset=preset)
        assert loaded.tuning == record
        assert loaded.config_hash() == expected.config_hash()
        assert loaded.train.epochs == 7 and loaded.train.batch_size == 128
        assert loaded.train.early_stopping_patience == base.train.early_stopping_patience  # not demo's 2
        assert loaded.train.learning_rate == pytest.approx(1.234e-3) and loaded.model.dropout == pytest.approx(0.31)
        assert [p.model_dump() for p in loaded.loss.schedule] == schedule
        assert loaded.model.embed_dim == 16  # the base configuration is kept too
    # provenance is not part of the hash
    assert expected.tuning is None
    assert load_config(path).model_copy(update={"tuning": _record(study="other")}).config_hash() == \
        expected.config_hash()


def test_write_recipe_refuses_an_invalid_parameter(tmp_path):
    with pytest.raises(ConfigError, match="model.dropout"):
        tuning.write_recipe(tmp_path / "r.yaml", EverestConfig(), {"model.dropout": 2.0}, _record())
    assert not (tmp_path / "r.yaml").exists()


# --------------------------------------------------------------------------------------------- the flow


SMALL_SPACE = """\
train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}
model.dropout: {low: 0.0, high: 0.5}
train.epochs: {low: 1, high: 2, integer: true}
"""


@pytest.fixture
def tune_run(tiny_data, tmp_path):
    """Runs the flow on the shrunk local profile: training tables only (no testing file), tiny model."""
    from flows.profiles import load_profile
    from flows.tune import make_flow

    data = tmp_path / "data"
    data.mkdir()
    for path in tiny_data.glob("training_data_M_24.csv"):
        shutil.copy(path, data)
    space = _write(tmp_path / "space.yaml", SMALL_SPACE)
    study = f"ci_tune_{uuid.uuid4().hex[:8]}"
    common = {"targets": ["M-24"], "folds": 2, "space_file": str(space), "data_dir": str(data),
              "output_dir": str(tmp_path / "out"), "study": study, "overrides": list(TINY), "seed": 0}
    flow = make_flow(for_test_machine(load_profile("local")))

    def run(trials: int, **changes):
        return flow(**(common | {"trials": trials} | changes), return_state=True)

    run.common = common
    run.tuning_dir = tmp_path / "out" / "tuning"
    run.storage = f"sqlite:///{(tmp_path / 'out' / 'tuning' / 'study.db').resolve()}"
    return run


def _snapshot(study) -> dict[int, tuple[str, float | None, dict]]:
    return {t.number: (t.state.name, t.value, dict(t.params)) for t in study.trials}


def _params_of(common: dict):
    from flows.tune import TuneParameters

    return TuneParameters(**common)


def test_flow_runs_the_study_writes_the_recipe_and_a_rerun_continues_it(prefect_server, tune_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    first = tune_run(4)
    assert first.is_completed(), first.message
    study = optuna.load_study(study_name=tune_run.common["study"], storage=tune_run.storage)
    assert len(study.get_trials(states=FINISHED)) == 4 and len(study.trials) == 4
    params = _params_of(tune_run.common)
    space = params.search_space(params.base_config())
    assert study.user_attrs["space_hash"] == space.space_hash()
    before = _snapshot(study)
    for _state, _value, trial_params in before.values():
        assert set(trial_params) == {"train.learning_rate", "model.dropout", "train.epochs"}
        assert trial_params["train.epochs"] in (1, 2)

    result = first.result()
    recipe = tune_run.tuning_dir / "tuned_config.yaml"
    assert Path(result["recipe"]) == recipe.resolve() or Path(result["recipe"]) == recipe
    loaded = load_config(recipe)
    assert loaded.tuning.study == tune_run.common["study"] and loaded.tuning.trials == 4
    assert loaded.tuning.best_trial == study.best_trial.number == result["best_trial"]
    assert loaded.tuning.best_value == pytest.approx(study.best_value)
    assert loaded.tuning.space_hash == space.space_hash() and loaded.tuning.folds == 2
    assert loaded.config_hash() == params.base_config().with_overrides(
        tuning.overrides_of(study.best_trial.params, space)).config_hash()
    assert loaded.model.embed_dim == 16  # built on the run's base configuration
    assert not list(tune_run.tuning_dir.glob("trial*/*fold*"))  # fold checkpoints removed

    key = f"everest-tune-{tune_run.common['study']}".replace("_", "-")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert artifacts, f"no artifact {key}"
    assert f"# Tuning study {tune_run.common['study']}" in artifacts[0].data
    assert "data:image/png;base64," in artifacts[0].data

    second = tune_run(6)
    assert second.is_completed(), second.message
    study = optuna.load_study(study_name=tune_run.common["study"], storage=tune_run.storage)
    after = _snapshot(study)
    assert len(study.get_trials(states=FINISHED)) == 6 and len(after) == 6
    assert {n: after[n] for n in before} == before  # the first trials are kept as they were
    new = [after[n][2] for n in after if n not in before]
    assert len(new) == 2 and all(p not in [b[2] for b in before.values()] for p in new)  # fresh draws
    assert load_config(recipe).tuning.trials == 6


def test_crashed_run_is_resumed_and_another_space_is_refused(prefect_server, tune_run, tmp_path):
    from flows.tune import _open_study

    params = _params_of(tune_run.common | {"trials": 2})
    base = params.base_config()
    space = params.search_space(base)
    # a run that crashed: the study exists with its identity, one trial was asked and never told
    study = _open_study(params, space, base)
    crashed = study.ask()
    crashed_values = tuning.suggest(crashed, space)
    del study
    assert optuna.load_study(study_name=params.study, storage=tune_run.storage).trials[0].state.name == "RUNNING"

    state = tune_run(2)
    assert state.is_completed(), state.message
    study = optuna.load_study(study_name=params.study, storage=tune_run.storage)
    trials = study.trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert len(study.get_trials(states=FINISHED)) == 2 and len(trials) == 3
    # its parameters were enqueued and tried first, as trial 1
    assert tuning.overrides_of(trials[1].params, space) == crashed_values, _snapshot(study)
    assert trials[1].state in FINISHED and trials[2].params != trials[1].params
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))

    # a study made with another search space (or folds) is refused, naming what changed, and left as it was
    other = tuning.load_search_space(_write(tmp_path / "other.yaml", SMALL_SPACE.replace("0.5", "0.4")), base)
    with pytest.raises(ConfigError, match=r"another space_hash") as info:
        _open_study(params, other, base)
    assert params.study in str(info.value) and "--study" in str(info.value)
    with pytest.raises(ConfigError, match=r"another folds"):
        _open_study(params.model_copy(update={"folds": 3}), space, base)
    with pytest.raises(ConfigError, match=r"another config_hash"):
        _open_study(params, space, base.with_overrides({"train.weight_decay": 0.5}))
    again = optuna.load_study(study_name=params.study, storage=tune_run.storage)
    assert _snapshot(again) == _snapshot(study) and again.user_attrs["space_hash"] == space.space_hash()

    refused = tune_run(3, space_file=str(tmp_path / "other.yaml"))  # the flow refuses it too, before any trial
    assert refused.is_failed() and "space_hash" in refused.message
    assert len(optuna.load_study(study_name=params.study, storage=tune_run.storage).trials) == 3


# --------------------------------------------------------------------------------------------- CLI, deployments


def test_refused_worker_job_ends_the_study_with_qsubs_words_mock_pbs_qsub(prefect_server, tiny_data, tmp_path,
                                                                          monkeypatch):
    """PBS Pro's reply to an unknown queue (mocked: PBS Pro cannot be installed here) ends the tuning run Failed
    with qsub's own message, instead of waiting forever for workers that never come."""
    from flows.profiles import load_profile
    from flows.tune import make_flow

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qsub").write_text("#!/bin/sh\necho 'qsub: Unknown queue' >&2\nexit 170\n")
    (fake / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    site = for_test_machine(load_profile("pbs"), gpus_per_job=0)
    space = _write(tmp_path / "s.yaml", SMALL_SPACE)
    state = make_flow(site)(targets=["M-24"], trials=2, folds=2, space_file=str(space), data_dir=str(tiny_data),
                            output_dir=str(tmp_path / "out"), profile="pbs", overrides=list(TINY), return_state=True)
    assert state.is_failed()
    assert "qsub failed with exit status 170: qsub: Unknown queue" in state.message, state.message


def test_cli_help_lists_the_tuning_options():
    r = subprocess.run([sys.executable, "-m", "flows.tune", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for option in ("--trials", "--folds", "--space", "--storage", "--study", "--metric", "--data-dir"):
        assert option in r.stdout


def test_cli_refuses_a_bad_space_file_with_exit_2_before_anything_runs(tiny_data, tmp_path):
    bad = _write(tmp_path / "bad.yaml", BAD_SPACE)
    out = tmp_path / "o"
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens: a server call would fail
    r = subprocess.run([sys.executable, "-m", "flows.tune", "--space", str(bad), "--data-dir", str(tiny_data),
                        "--output-dir", str(out), "--trials", "2", "--folds", "2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for fragment in ("train.no_such", "train.learning_rate", "train.weight_decay", "model.dropout",
                     "train.batch_size", "loss.focal_gamma_max"):
        assert fragment in errors[0]
    assert "everest-tune: study" not in r.stdout  # refused before the plan line
    assert not out.exists()


@pytest.mark.parametrize(("values", "fragment"), [({"folds": 1}, "folds"), ({"folds": 11}, "folds"),
                                                  ({"trials": 0}, "trials"), ({"metric": "val_f1"}, "metric"),
                                                  ({"targets": ["X-12"]}, "invalid target 'X-12'")])
def test_tune_parameters_refuse_bad_values(values, fragment):
    from flows.tune import TuneParameters

    with pytest.raises(ValueError, match=fragment):
        TuneParameters(**values)


@pytest.mark.parametrize("variant", ["local", "pbs", "slurm"])
def test_deployment_entrypoints_load_the_described_flow(variant):
    from prefect.flows import load_flow_from_entrypoint

    loaded = load_flow_from_entrypoint(f"flows.tune:tune_{variant}")
    assert loaded.name == "everest-tune"
    schema = loaded.parameters.model_dump()
    props = schema["properties"]
    assert {"targets", "trials", "folds", "space_file", "storage", "study", "profile", "overrides"} <= set(props)
    for name, prop in props.items():
        assert prop.get("description"), f"{name} has no description"
        assert "anyOf" not in prop, f"{name} offers a null choice: {prop}"
    assert props["profile"]["default"] == variant
    assert props["trials"]["default"] == 30 and props["folds"]["default"] == 3


def test_prefect_yaml_deploys_the_tuning_flow_on_every_profile():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    tune = {d["entrypoint"]: d for d in spec["deployments"] if d["entrypoint"].startswith("flows.tune:")}
    assert set(tune) == {f"flows.tune:tune_{v}" for v in ("local", "pbs", "slurm")}
    for variant in ("local", "pbs", "slurm"):
        deployment = tune[f"flows.tune:tune_{variant}"]
        assert deployment["name"] == variant and deployment["parameters"]["profile"] == variant
        assert deployment["work_pool"]["name"] == "everest" and deployment.get("description")


def test_cli_refuses_a_training_table_without_positives_before_anything_runs(tiny_data, tmp_path):
    """The same reader and the same rule as training: refused with exit 2 before a server, never a testing file."""
    data = tmp_path / "d"
    data.mkdir()
    table = (tiny_data / "training_data_M5_24.csv").read_text()
    (data / "training_data_M5_24.csv").write_text(re.sub(r"^P,", "N,", table, flags=re.MULTILINE))
    out = tmp_path / "o"
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens: a server call would fail
    r = subprocess.run([sys.executable, "-m", "flows.tune", "--targets", "M5-24", "--data-dir", str(data),
                        "--output-dir", str(out), "--trials", "2", "--folds", "2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training_data_M5_24.csv: no positive samples" in errors[0], r.stderr
    assert "everest-tune: study" not in r.stdout and not out.exists()


@pytest.mark.slow
def test_cli_sigterm_cancels_the_study_run_and_stops_its_server(tiny_data, tmp_path):
    """``python -m flows.tune`` ends on SIGTERM as ``flows.production`` does (one command-line wrapper): exit
    128 + 15, the flow run Cancelled with the reason, one line on stderr, no traceback; the study is kept."""
    import signal
    import sqlite3
    import time

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_data / "training_data_M_24.csv", data)
    space, out, home = _write(tmp_path / "space.yaml", SMALL_SPACE), tmp_path / "out", tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"PREFECT_HOME": str(home)}
    args = [sys.executable, "-m", "flows.tune", "--targets", "M-24", "--trials", "50", "--folds", "2", "--space",
            str(space), "--data-dir", str(data), "--output-dir", str(out), "--profile", "local",
            *[f"--set={o}" for o in TINY]]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "tuning" / "study.db").is_file() and time.monotonic() < deadline:  # the flow is running
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("terminated by SIGTERM")]
    assert len(lines) == 1 and "marked Cancelled; rerun the same command to resume" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("SELECT state_name FROM flow_run").fetchall()
    assert states == [("Cancelled",)]
    assert (out / "tuning" / "study.db").is_file()
