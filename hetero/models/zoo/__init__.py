"""The built-in networks, one family a module, each builder registering itself (:func:`..registry.register`).

Imported in this order, which is the order of :func:`..registry.network_names`: families together, small to large.
"""

from . import mobilenet, squeezenet, resnet, inception, vgg, densenet, bert  # noqa: F401, I001 - registration order
