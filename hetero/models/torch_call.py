"""A PyTorch module of several named inputs as every engine calls one: ``module(*tensors)``, one tensor per
input in the network's order, returning one tensor or a tuple of them (imported only where torch is)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch


class CalledByPosition(torch.nn.Module):
    """`module`, called with its inputs by name where its ``forward`` names them all (a Hugging Face model's
    ``forward(input_ids, attention_mask=None, token_type_ids=None, ...)`` takes them in another order than a
    caller may give them), else in the order given; what it returns (a tensor, a tuple, a dict or a
    ``ModelOutput``) flattened to a tensor or a tuple of tensors."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.module = module
        self.names = tuple(names)
        parameters = inspect.signature(module.forward).parameters
        self.by_name = all(name in parameters for name in self.names)

    def forward(self, *tensors: torch.Tensor):  # noqa: ANN201 - a tensor or a tuple of them
        result = self._call(tensors)
        if isinstance(result, Mapping):
            result = tuple(result.values())
        return result if isinstance(result, torch.Tensor) or len(result) > 1 else result[0]

    def output_names(self, tensors: Sequence[torch.Tensor]) -> list[str]:
        """The names the module gives its outputs when called on `tensors`: a dict's keys, else none."""
        with torch.inference_mode():
            result = self._call(tensors)
        return [str(key) for key in result] if isinstance(result, Mapping) else []

    def _call(self, tensors: Sequence[torch.Tensor]):  # noqa: ANN202 - whatever the module returns
        return self.module(**dict(zip(self.names, tensors))) if self.by_name else self.module(*tensors)
