"""hetero's own schedules: what TVM's defaults leave slow, scheduled without tuning.

``base/`` holds what every target shares: the rule protocol and the pass that applies a literal list
of rules to every kernel (:mod:`.base.rule`), the analysis of loops and blocks (:mod:`.base.analysis`)
and the one convolution matcher (:mod:`.base.conv`).  ``cpu/`` and ``cuda/`` hold one rule per file
and their pipelines; ``cuda/wgmma/`` the Hopper conv kernels.  Nothing here registers anything or
changes TVM when imported: a pipeline sets up what it needs when it is built.
"""
