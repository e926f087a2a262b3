import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp, softmax

from can_jax.dual import masked_log_softmax


def test_matches_scipy_on_masked_rows_with_huge_logits():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(5, 7)) * 50 + 300  # scores/β in the hundreds are normal (DESIGN §2)
    mask = rng.random((5, 7)) < 0.7
    mask[:, 0] = True
    lse, w = masked_log_softmax(jnp.asarray(s), jnp.asarray(mask))
    for i in range(5):
        row = s[i][mask[i]]
        np.testing.assert_allclose(lse[i], logsumexp(row), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(w[i])[mask[i]], softmax(row), rtol=1e-12, atol=1e-300)
        assert np.all(np.asarray(w[i])[~mask[i]] == 0)


def test_fully_masked_row_is_finite_zero_weights():
    s = jnp.array([[1.0, 2.0], [np.nan, np.inf]])
    mask = jnp.array([[True, True], [False, False]])
    lse, w = masked_log_softmax(s, mask)
    assert lse[1] == -np.inf
    assert np.all(np.asarray(w[1]) == 0)
    np.testing.assert_allclose(lse[0], logsumexp([1.0, 2.0]))
