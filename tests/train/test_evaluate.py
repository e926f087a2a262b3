"""The reweighted gains behind `can evaluate --train-scores` and PeCAN's implied gains, against NumPy."""

import numpy as np
import pytest

pytest.importorskip("torch")


def test_tilt_gains_match_numpy_self_normalised_weights():
    import jax

    jax.config.update("jax_enable_x64", True)
    from train.evaluate import tilt_gains

    rng = np.random.default_rng(0)
    n, k, m, beta = 30, 5, 2, 0.7
    ids = np.repeat(rng.permutation(n) * 7 + 3, k)  # arbitrary, non-contiguous prompt ids
    s = rng.normal(size=n * k)
    g = rng.normal(size=(n * k, m))
    w = np.exp(s.reshape(n, k) / beta)
    w /= w.sum(1, keepdims=True)
    expect = ((w[..., None] * g.reshape(n, k, m)).sum(1) - g.reshape(n, k, m).mean(1)).mean(0)
    np.testing.assert_allclose(tilt_gains(ids, s, g, beta), expect, rtol=1e-10)


def test_insample_gains_are_zero_for_the_reference_itself(tiny_lm, tmp_path):
    from train.collect import CollectConfig, collect
    from train.evaluate import insample_gains

    _, _, path = tiny_lm
    f = tmp_path / "p.txt"
    f.write_text("hello\ntell me a joke.\n")
    cfg = CollectConfig(prompts=str(f), policy=str(path), scorers=["len=tests.train.toy_scorers:length"], k=3,
                        max_new_tokens=5)  # fmt: skip
    table = collect(cfg, tmp_path / "s.parquet")
    assert insample_gains(str(path), table, ["len"])["len"] == pytest.approx(0.0, abs=1e-6)
