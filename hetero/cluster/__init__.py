"""Streams across the machines of a Ray cluster: one hetero worker per node owns that node's devices.

    hetero.stream("resnet-50", "all", "images.npy", "logits.npy", ray="auto")
    python Inference.py --network resnet-50 --input images.npy --output logits.npy --ray auto
    python Inference.py --list-devices --ray HOST:PORT

Ray is an optional extra (``pip install 'hetero[ray]'``), imported only here. Each node of the cluster
runs one actor (:class:`~hetero.cluster.node.NodeWorker`, pinned to its node) that finds the node's
devices, loads each device's engines as a run on that machine would (the same ``engine`` text) and
profiles them there. It starts from the driver's profile table (the driver sends the profiles it holds
for the node's devices) and sends back what it measured, which the driver keeps in its table file, each
profile under the node's hardware; identical nodes profile once. Every node runs the driver's own hetero:
the package travels with the job (Ray's ``py_modules``), and a node whose hetero differs is left out
and reported.

The driver keeps the stream's one queue and its record, as :func:`hetero.stream` does (outputs
memory-mapped on the driver in input order, a killed run resumed by the same call), and per device of
every node a thread that takes a chunk, hands it to Ray's object store with the call to its node, writes
the outputs that come back and records them; each device has its next chunk on the way while it computes
one. Moving chunks is planned for like any copy (:mod:`hetero.cluster.driver`).

A node that dies mid-run loses nothing: the chunks it had taken go back to the queue for the other nodes'
devices, and the report lists the fault per device ("node1/cpu"); a device whose engine fails is dropped
the same way.

Safety: Ray's servers have no authentication of their own, so hetero never starts a Ray head that listens
beyond this machine (:mod:`hetero.cluster.connect`).
"""

from .connect import connect, connected, listening_beyond_loopback, loopback_only
from .driver import Link, Moved, NodeDeviceStream, stream
from .node import ALL, Node, NodeWorker, cluster_nodes, list_devices, node_devices

__all__ = [
    "ALL",
    "Link",
    "Moved",
    "Node",
    "NodeDeviceStream",
    "NodeWorker",
    "cluster_nodes",
    "connect",
    "connected",
    "list_devices",
    "listening_beyond_loopback",
    "loopback_only",
    "node_devices",
    "stream",
]
