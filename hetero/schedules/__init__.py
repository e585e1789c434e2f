"""hetero's own schedules: what TVM's defaults leave slow, scheduled without tuning.

``base/`` holds what every target shares: the rule protocol and the pass that applies a literal list
of rules to every kernel (:mod:`.base.rule`), the analysis of loops and blocks (:mod:`.base.analysis`)
and the one convolution matcher (:mod:`.base.conv`).  ``cpu/`` and ``cuda/`` hold one rule per file
and their pipelines; ``cuda/wgmma/`` the Hopper conv kernels.  Nothing here registers anything or
changes TVM when imported: a pipeline sets up what it needs when it is built.
"""

# the function into which both pipelines lift the work on the weights alone (layout changes, casts, packing):
# relax.transform.LiftTransformParams names it for main; an engine runs it once when it loads
TRANSFORM_PARAMS = "main_transform_params"
