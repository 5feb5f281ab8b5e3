"""The verdict judges every count, and the scheme is chosen by measurement."""

from __future__ import annotations

import pytest

from vitssl.train.edge.verify import VerifySettings, checks, choose


def _lat(ms: float) -> dict[str, float]:
    return {"median_ms": ms}


def _report(fp_acc, q_acc, cos, agree, fp_ms, q_ms, classes=10) -> dict:
    fp = {"accuracy": fp_acc, "latency": {b: _lat(m) for b, m in fp_ms.items()}}
    q = {
        "accuracy": q_acc,
        "output_cosine": cos,
        "agreement": agree,
        "latency": {b: _lat(m) for b, m in q_ms.items()},
    }
    return {
        "models": {"fp32": fp, "int8": q},
        "num_classes": classes,
        "drop": fp_acc - q_acc,
        "speedup": {b: fp_ms[b] / q_ms[b] for b in fp_ms},
        "runtime": "onnxruntime",
    }


def _failed(report, kind="embedding", **settings) -> list[str]:
    return [c["check"] for c in checks(report, kind, VerifySettings(**settings)) if not c["passed"]]


def test_a_good_int8_model_passes_every_check():
    r = _report(60.0, 59.5, 0.99, 97.0, {"1": 10.0, "32": 100.0}, {"1": 6.0, "32": 40.0})
    assert _failed(r) == []


def test_near_chance_fp32_is_refused_even_with_no_drop():
    # the case: k-NN 10.8 -> 10.2 on 10 classes, INT8 and FP32 agreeing on 20 %
    r = _report(10.8, 10.2, 0.99, 20.0, {"1": 10.0}, {"1": 5.0})
    assert _failed(r) == ["FP32 accuracy above chance"]
    assert _failed(r, min_over_chance=0.5) == []


def test_slower_int8_fails_unless_explicitly_allowed():
    r = _report(60.0, 60.0, 0.999, 99.0, {"1": 10.0, "32": 100.0}, {"1": 38.0, "32": 380.0})
    assert _failed(r) == [
        "INT8 speed-up at batch 1 (onnxruntime)",
        "INT8 speed-up at batch 32 (onnxruntime)",
    ]
    assert _failed(r, min_speedup=0.0) == []  # the explicit override


def test_low_cosine_or_agreement_fails_within_the_drop():
    r = _report(60.0, 60.0, 0.90, 80.0, {"1": 10.0}, {"1": 5.0})
    assert _failed(r, kind="embedding") == ["mean cosine INT8 vs FP32"]
    assert _failed(r, kind="logits") == ["top-1 agreement INT8 vs FP32 (%)"]
    r = _report(60.0, 58.0, 0.999, 99.0, {"1": 10.0}, {"1": 5.0})
    assert _failed(r) == ["accuracy drop (points)"]


def _scheme(drop, cos, speed):
    return {"drop": drop, "output_cosine": cos, "agreement": 99.0, "speedup": speed}


def test_choose_takes_the_fastest_scheme_meeting_the_bounds():
    s = VerifySettings()
    schemes = {
        "u8s8": _scheme(0.2, 0.99, {"1": 2.0, "32": 2.5}),
        "s8s8": _scheme(0.1, 0.995, {"1": 0.3, "32": 0.3}),
        "u8s8_rr": _scheme(2.0, 0.99, {"1": 3.0, "32": 3.0}),  # fastest but loses 2 points
    }
    assert choose(schemes, "embedding", s) == "u8s8"
    schemes["u8s8"]["output_cosine"] = 0.9
    assert choose(schemes, "embedding", s) == "s8s8"
    # none accurate: the smallest drop ships (and the verdict fails on it)
    schemes["s8s8"]["drop"] = 1.5
    assert choose(schemes, "embedding", s) == "u8s8"


def test_verify_settings_refuse_unknown_runtimes():
    with pytest.raises(ValueError, match="runtimes"):
        VerifySettings(runtimes=["tflite"])
    with pytest.raises(ValueError, match="twice"):
        VerifySettings(runtimes=["openvino", "openvino"])


def test_the_pipeline_names_the_check_that_failed(tmp_path, monkeypatch):
    """A failed export is recorded with the report's own verdict (every failed check), not
    as an accuracy drop: here only the second runtime's drop fails."""
    from vitssl.train.edge import pipeline, run

    verdict = "FAILED: accuracy drop on openvino (points)"
    monkeypatch.setattr(
        run, "run_export", lambda cfg: {"passed": False, "drop": 0.2, "verdict": verdict}
    )
    chain = pipeline._Chain(tmp_path)
    assert chain.export("student", None) is not None
    assert (chain.results[-1].code, chain.results[-1].why) == (pipeline.EXIT_VERIFY, verdict)
