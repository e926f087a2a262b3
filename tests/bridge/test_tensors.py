import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bridge.tensors import lambda_tensor, to_jax, to_torch  # noqa: E402


def test_jax_to_torch_shares_memory_and_roundtrips():
    x = jnp.arange(12.0).reshape(3, 4)  # float64 under the test config
    t = to_torch(x)
    assert t.dtype == torch.float64 and tuple(t.shape) == (3, 4)
    assert t.data_ptr() == x.unsafe_buffer_pointer()  # zero copy
    np.testing.assert_array_equal(t.numpy(), np.asarray(x))
    back = to_jax(t)
    assert back.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_torch_to_jax_and_lambda_tensor():
    t = torch.linspace(0, 1, 5, dtype=torch.float32)
    x = to_jax(t)
    assert x.dtype == jnp.float32 and x.unsafe_buffer_pointer() == t.data_ptr()
    from bridge.certificate import Certificate

    constraints = [{"name": "a", "kind": "utility", "margin": 0.1, "lambda": 0.5},
                   {"name": "b", "kind": "cost", "margin": 0.1, "lambda": 0.0}]  # fmt: skip
    body = {"format": "can.dual-certificate", "format_version": 2, "converged": True, "status": "converged",
            "beta": 1.0, "constraints": constraints, "lambda": {"a": 0.5, "b": 0.0},
            "data": {"reward": "r", "prompt_id": "p"}}  # fmt: skip
    cert = Certificate.from_dict(body)
    assert lambda_tensor(cert).tolist() == [0.5, 0.0]
