"""JAX ↔ torch in one process through DLPack: no copy where both sit on the same device (DESIGN §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_torch(x: jax.Array):
    """A torch tensor sharing `x`'s memory (same device, same dtype)."""
    import torch

    return torch.from_dlpack(x)


def to_jax(t) -> jax.Array:
    """A JAX array sharing the torch tensor's memory. The tensor must be contiguous; it is not copied."""
    return jnp.from_dlpack(t.detach())


def lambda_tensor(cert, device=None, dtype=None):
    """λ* from a certificate as a torch tensor, in the certificate's constraint order."""
    import torch

    values = list(cert.lam.values())
    return torch.tensor(values, device=device, dtype=dtype or torch.float64)
