"""The Keras patterns users write, each as a small real ``fit`` on synthetic data.

Every test checks what a user would: the steps recorded, the layer names, and the norms
against a ``tf.GradientTape`` computation of the same batch (rtol 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import RecordingTransport


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


def layer_norms(grads, variables, owners) -> dict[str, float]:
    """Per-layer L2 norms of ``grads`` in float64, by each variable's owner name."""
    sums: dict[str, float] = {}
    for grad, variable in zip(grads, variables, strict=True):
        owner = owners[id(variable)]
        sums[owner] = sums.get(owner, 0.0) + float(np.sum(np.square(np.asarray(grad, np.float64))))
    return {name: float(np.sqrt(total)) for name, total in sums.items()}
