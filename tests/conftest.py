"""Test-wide settings: quiet TensorFlow, two logical CPUs for tf.distribute tests, and no
wall-clock deadline for hypothesis examples.

The logical devices must be configured before TensorFlow initialises its runtime,
so it happens here, when pytest first loads the test tree. Server-only runs do not
need TensorFlow, so it is only configured when it is installed.
"""

import os
import tempfile

import pytest
from hypothesis import settings

# Hypothesis fails an example that takes over 200 ms by default: a wall-clock limit, which a
# loaded 2-core machine breaks (a first example that imports the server took 272 ms). Tests
# check behaviour; speed is the benchmarks' job.
settings.register_profile("gradwatch", deadline=None)
settings.load_profile("gradwatch")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# Incident bundles of monitors made by tests go to a temporary directory, not ./gradwatch-runs.
os.environ.setdefault("GRADWATCH_INCIDENT_DIR", tempfile.mkdtemp(prefix="gradwatch-incidents-"))

try:
    import tensorflow as tf
except ImportError:  # pragma: no cover - the agent extra is not installed
    tf = None

if tf is not None:
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


@pytest.fixture(scope="session")
def mirrored():
    """MirroredStrategy over the two logical CPUs that tests/conftest.py configures.

    One for the whole session: separate MirroredStrategy objects in one process
    reuse collective instance keys and abort each other's all-reduces.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
