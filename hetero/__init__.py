"""hetero: split one inference batch across every device of a machine so that all finish together.

The command lines are thin layers over this API:

    import hetero
    report = hetero.infer("resnet-18", "cpu,gpu0", batch=100)
    hetero.stream("resnet-18", "cpu,gpu0", "images.npy", "logits.npy")  # any length, resumable
    with hetero.Session("resnet-18", "cpu,gpu0") as session:  # prepared once, run many times
        session.run(batch=100)
"""

from ._tvm_import import import_tvm

import_tvm()

from .devices import Device, available_devices, parse_devices
from .errors import HeteroError
from .inference import InferenceReport
from .models import FormUnavailableError, Network, from_torch, get_network, network_names
from .session import Options, Session, infer, stream, stream_arrays
from .stream import StreamReport

__all__ = [
    "Device",
    "FormUnavailableError",
    "HeteroError",
    "InferenceReport",
    "Network",
    "Options",
    "Session",
    "available_devices",
    "from_torch",
    "get_network",
    "infer",
    "network_names",
    "parse_devices",
    "stream",
    "stream_arrays",
    "StreamReport",
]
