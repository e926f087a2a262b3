import jax
import jax.numpy as jnp
import numpy as np
import pytest

from can_jax.dual import dual_grad, dual_hessian, dual_pass, dual_value
from can_jax.scores import from_padded
from tests.conftest import groups_to_scores, make_groups
from tests.reference import ref_grad, ref_hess, ref_value

LAM = np.array([0.7, 0.0, 1.3])
B = np.array([0.1, -0.2, 0.3])


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_value_grad_hessian_match_independent_reference(small_groups, small_scores, beta):
    ev = dual_pass(jnp.asarray(LAM), small_scores, jnp.asarray(B), beta)
    np.testing.assert_allclose(ev.value, ref_value(LAM, small_groups, B, beta), rtol=1e-12)
    np.testing.assert_allclose(ev.grad, ref_grad(LAM, small_groups, B, beta), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ev.hess, ref_hess(LAM, small_groups, B, beta), rtol=1e-9, atol=1e-12)


def test_gradient_and_hessian_match_finite_differences(small_scores):
    b, beta, h = jnp.asarray(B), 0.5, 1e-5
    f = lambda lam: float(dual_value(jnp.asarray(lam), small_scores, b, beta))  # noqa: E731
    g = lambda lam: np.asarray(dual_grad(jnp.asarray(lam), small_scores, b, beta))  # noqa: E731
    fd_grad = np.array([(f(LAM + h * e) - f(LAM - h * e)) / (2 * h) for e in np.eye(3)])
    fd_hess = np.array([(g(LAM + h * e) - g(LAM - h * e)) / (2 * h) for e in np.eye(3)])
    np.testing.assert_allclose(g(LAM), fd_grad, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dual_hessian(jnp.asarray(LAM), small_scores, b, beta), fd_hess, rtol=1e-6, atol=1e-8)


def test_autodiff_of_value_agrees_with_closed_forms(small_scores):
    lam, b, beta = jnp.asarray(LAM), jnp.asarray(B), 0.3
    f = lambda l: dual_value(l, small_scores, b, beta)  # noqa: E731
    ev = dual_pass(lam, small_scores, b, beta)
    np.testing.assert_allclose(jax.grad(f)(lam), ev.grad, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(jax.hessian(f)(lam), ev.hess, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block", [1, 7, 16, None, "auto"])
def test_block_size_does_not_change_the_answer(small_groups, small_scores, block):
    ev = dual_pass(jnp.asarray(LAM), small_scores, jnp.asarray(B), 1.0, block=block)
    np.testing.assert_allclose(ev.value, ref_value(LAM, small_groups, B, 1.0), rtol=1e-12)
    np.testing.assert_allclose(ev.grad, ref_grad(LAM, small_groups, B, 1.0), rtol=1e-10, atol=1e-12)


def test_extra_padding_columns_and_prompt_order_do_not_matter(small_groups):
    a = groups_to_scores(small_groups)
    wide = groups_to_scores(small_groups, k=20)  # more padding per prompt
    shuffled = groups_to_scores(small_groups[::-1])
    evs = [dual_pass(jnp.asarray(LAM), s, jnp.asarray(B), 1.0) for s in (a, wide, shuffled)]
    for ev in evs[1:]:
        np.testing.assert_allclose(ev.value, evs[0].value, rtol=1e-13)
        np.testing.assert_allclose(ev.grad, evs[0].grad, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(ev.hess, evs[0].hess, rtol=1e-11, atol=1e-14)


def test_prompt_weights_equal_duplicated_prompts(small_groups):
    """Weight 2 on a prompt is the same as listing it twice (the bootstrap relies on it)."""
    sc = groups_to_scores(small_groups)
    w = np.ones(len(small_groups))
    w[3] = 2.0
    weighted = sc._replace(weight=jnp.asarray(w))
    dup = groups_to_scores(small_groups + [small_groups[3]])
    a = dual_pass(jnp.asarray(LAM), weighted, jnp.asarray(B), 1.0)
    b = dual_pass(jnp.asarray(LAM), dup, jnp.asarray(B), 1.0)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-13)
    np.testing.assert_allclose(a.hess, b.hess, rtol=1e-11)


def test_float32_agrees_with_float64():
    groups = make_groups(3, 400, 16, 4)
    lam, b = np.array([0.5, 0.2, 0.0, 1.0]), np.full(4, 0.1)
    e64 = dual_pass(jnp.asarray(lam), groups_to_scores(groups), jnp.asarray(b), 1.0)
    s32 = groups_to_scores(groups, dtype=jnp.float32)
    e32 = dual_pass(jnp.asarray(lam, jnp.float32), s32, jnp.asarray(b, jnp.float32), 1.0)
    assert e32.value.dtype == jnp.float32
    np.testing.assert_allclose(e32.value, e64.value, rtol=1e-5)
    np.testing.assert_allclose(e32.grad, e64.grad, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(e32.hess, e64.hess, rtol=1e-4, atol=2e-5)


def test_known_answer_scipy_checkoptimize():
    """scipy's CheckOptimize maxent problem log Σ exp(F x) − Kᵀx is our dual for one prompt, five responses.

    Its documented solution is x = (0, −0.524869316, 0.487525860); with utilities (−F₂, F₃) and λ = (−x₂, x₃)
    it is interior to λ ≥ 0, so λ* = (0.524869316, 0.487525860). That recorded solution is itself accurate
    only to ~2e-6 (the maxent gradient there is 5e-7), so we also check the maxent optimality condition
    softmax(F x)ᵀF = K directly at our answer.
    """
    from scipy.special import softmax

    from can_jax.solve import solve_dual

    F = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 0, 0]], float)
    K = np.array([1.0, 0.3, 0.5])
    g = np.stack([-F[:, 1], F[:, 2]], axis=1)[None]  # [1, 5, 2]
    margins = np.array([-K[1], K[2]]) - g[0].mean(axis=0)  # ḡ + b = (−K₂, K₃)
    sc = from_padded(np.zeros((1, 5)), g)
    res = solve_dual(sc, jnp.asarray(margins), 1.0)
    np.testing.assert_allclose(res.x, [0.524869316, 0.487525860], atol=5e-6)
    x = np.array([0.0, -float(res.x[0]), float(res.x[1])])
    np.testing.assert_allclose(softmax(F @ x) @ F, K, atol=2e-9)
