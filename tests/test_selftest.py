"""``python -m mmgrad.selftest`` (what the wheel smoke test runs) passes on this install and
catches a wrong or missing kernel."""

import pytest
from mmgrad import ops, reference, selftest
from mmgrad._extension import cpp_error


@pytest.mark.skipif(cpp_error() is not None, reason=f"C++ extension not built: {cpp_error()}")
def test_selftest_passes_with_the_cpp_backend(capsys):
    assert selftest.main(["--require", "cpp"]) == 0
    out = capsys.readouterr().out
    for op in ("gram", "combine", "segment_moments", "segment_gram", "segment_combine_", "segment_scale_", "segment_lerp_"):
        assert f"cpp               float32           {op:<16}  ok" in out


def test_selftest_reports_a_wrong_kernel(monkeypatch, capsys):
    # Serve CPU tensors from a "cpp" backend whose gram is off by one in a corner.
    def wrong_gram(J):
        G = reference.gram(J)
        G[0, 0] += 1
        return G

    monkeypatch.setattr(ops, "_backend_error", lambda b, d: None if b in ("reference", "cpp") else "off in this test")
    monkeypatch.setattr(ops._CppBackend, "gram", staticmethod(wrong_gram))
    if cpp_error() is not None:  # no _C: let the other "cpp" ops fall back to the reference too
        for name in ("combine", "segment_moments", "segment_gram", "segment_combine_", "segment_scale_", "segment_lerp_"):
            monkeypatch.setattr(ops._CppBackend, name, getattr(reference, name))
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    assert "gram              MISMATCH" in out and "FAILED" in out


def test_selftest_fails_when_a_required_backend_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(ops, "_backend_error", lambda b, d: None if b == "reference" else "not built in this test")
    assert selftest.main(["--require", "cpp"]) == 1
    assert "unavailable: not built in this test" in capsys.readouterr().out
