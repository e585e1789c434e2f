"""The networks hetero runs: standard CNNs built in TVM Relax, plus ONNX and PyTorch import.

Laid out as timm keeps its models: :mod:`.network` (the :class:`Network` an engine loads), :mod:`.registry`
(``@register``, :func:`get_network`, :func:`network_names`), one module per CNN family under :mod:`.zoo`
that registers its networks, :mod:`.onnx_import` (``get_network("model.onnx")``) and :mod:`.torch_import`
(:func:`from_torch`).

Every network is one Relax function ``main(x, *weights) -> logits`` whose batch dimension is a symbolic
``n``, so one compiled module serves every batch size.  Weights are function parameters, not constants
(compiled modules stay small); ``Network.params`` holds their values, in parameter order.  A registered
network's are random but deterministic; BatchNorm is folded into the preceding conv on the host.  Nothing is
downloaded.  One builder gives the network in every form an engine runs: the Relax module
(``Network.module``), an ONNX model (``Network.onnx_model()``) and a PyTorch module
(``Network.torch_module()``), all with the same weights.

An .onnx file of several inputs or outputs (a BERT-style encoder's ``input_ids`` and ``attention_mask``) is a
network of named :class:`~.network.Tensor` s (``Network.inputs``), its sequence length left open until inputs
fix it (``Network.fit``); one sample is then a numpy record of its inputs, which the data path splits as it
splits a batch of one tensor.
"""

from . import zoo  # noqa: F401 - the built-in networks register themselves
from .network import FormUnavailableError, Network
from .onnx_import import OnnxUnavailableError
from .registry import UnknownNetworkError, get_network, network_names, register, registered_input_shape
from .torch_import import TorchConversionError, from_torch

__all__ = [
    "FormUnavailableError",
    "Network",
    "OnnxUnavailableError",
    "TorchConversionError",
    "UnknownNetworkError",
    "from_torch",
    "get_network",
    "network_names",
    "register",
    "registered_input_shape",
]
