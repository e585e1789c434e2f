"""MetaSchedule tuning on request (CPU and CUDA devices), kept in a database next to the profile table.

MetaSchedule tunes loops of known length only: with the batch dimension symbolic every candidate fails
(`SamplePerfectTile`), and records tuned at one batch match no other batch's workloads. So a tuning
belongs to one batch: the tuned module is compiled for exactly that many samples, and an engine runs
a share's whole chunks of that batch through it and the rest through hetero's symbolic module.

Tuning records persist as MetaSchedule's JSON database in `<table>.tuning/<network>-<device>-b<batch>/`
and every later compile for that network, device and batch applies them, with hetero's own schedules
for whatever the records do not cover. Each process times the tuned module against hetero's at that
batch and uses it only where it is faster: at small trial budgets it is slower (squeezenet_v1.1 at batch
8 on this 2-core machine: 60 img/s after about 250 trials, against 98 img/s for hetero's schedules).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from .devices import Device
from .errors import HeteroError, one_line
from .models import Network
from .schedules import TRANSFORM_PARAMS
from .schedules.base.tvmscript import tensor_intrinsics

log = logging.getLogger(__name__)

TUNABLE_KINDS = ("cpu", "cuda")


def tunable(device: Device) -> bool:
    """Whether MetaSchedule can tune TVM's module for `device`."""
    return device.kind in TUNABLE_KINDS
_RECORD_FILES = ("database_workload.json", "database_tuning_record.json")


class TuningError(HeteroError):
    """MetaSchedule could not tune a network for a device."""


@dataclass(frozen=True)
class Tuning:
    """Where the records of one network, device and batch live."""

    records: Path  # MetaSchedule's JSON database folder
    batch: int

    def has_records(self) -> bool:
        return all((self.records / name).is_file() for name in _RECORD_FILES) and bool(
            (self.records / _RECORD_FILES[1]).read_bytes().strip())

    def digest(self) -> str:
        """Names the records' content, so compiled modules and profiles follow every change to them."""
        hashed = hashlib.sha256(str(self.batch).encode())
        for name in _RECORD_FILES:
            hashed.update((self.records / name).read_bytes())
        return hashed.hexdigest()[:12]


def tuning_for(table_path: Path, network: Network, device: Device, batch: int) -> Tuning:
    """The tuning of `network` on `device` at `batch` that belongs with the profile table at `table_path`."""
    device_id = hashlib.sha256(device.key.encode()).hexdigest()[:12]
    folder = table_path.parent / f"{table_path.stem}.tuning" / f"{network.key.replace('@', '-')}-{device_id}-b{batch}"
    return Tuning(folder, batch)


def static_module(network: Network, batch: int) -> tvm.IRModule:
    """The network with its batch dimension fixed, as MetaSchedule needs it."""
    return relax.transform.BindSymbolicVars({"n": batch})(network.module)


def tuning_tasks_module(network: Network, device: Device, batch: int) -> tvm.IRModule:
    """The network at `batch` as the device's pipeline has it just before scheduling: MetaSchedule's tasks
    come from exactly these functions, so that its records match the ones a later build schedules (from
    the raw module it extracts no task at all, silently)."""
    module = static_module(network, batch)
    if device.kind == "cuda":
        from .schedules.cuda.pipeline import fused_module

        # the kernels that prepare the weights run once per engine: not worth a trial
        fused = fused_module(module, device.target, device.precision)
        per_call = tvm.IRModule({gv: f for gv, f in fused.functions_items() if gv.name_hint != TRANSFORM_PARAMS})
        return relax.transform.DeadCodeElimination(["main"])(per_call)
    from .schedules.cpu.pipeline import fusion_passes

    with device.target:
        return tvm.transform.Sequential(fusion_passes(device.target))(module)


def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params) -> tvm.runtime.Module:
    """MetaSchedule's default build without its `import tvm.s_tir.tensor_intrin`, which costs each
    fresh builder process about 16 s and which CPU fp32 schedules do not use."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def tune(network: Network, device: Device, tuning: Tuning, trials: int, trials_per_round: int = 8) -> None:
    """Run `trials` MetaSchedule trials for `network` on `device` at the tuning's batch, adding to its records.

    Every task gets one round of `trials_per_round` before the budget is shared out, so fewer trials
    than tasks x rounds still measure one round of each. Records are written when tuning ends.
    """
    import cloudpickle
    from tvm.s_tir import meta_schedule as ms

    if not tunable(device):
        raise TuningError(f"tuning works on CPU and CUDA devices; {device.name} is a {device.kind} device")
    target = device.target
    fused = tuning_tasks_module(network, device, tuning.batch)
    tuning.records.mkdir(parents=True, exist_ok=True)
    # The builder's worker processes get _build_candidate itself, not its module's name: they may not
    # find hetero on their path (a script run from another folder, hetero not installed).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    tensor_intrinsics()  # MetaSchedule's tasks import them: here first, they take seconds instead of a minute
    try:
        ms.relax_integration.tune_relax(
            fused, params=None, target=target, work_dir=str(tuning.records), max_trials_global=trials,
            num_trials_per_iter=min(trials, trials_per_round), cost_model=cost_model, seed=0,
            # CUDA candidates may use tensor-core intrinsics: its builder keeps their import
            builder=ms.builder.LocalBuilder(timeout_sec=120, **({"f_build": _build_candidate}
                                                                if device.kind == "cpu" else {})),
            runner=ms.runner.LocalRunner(timeout_sec=60),
        )
    except Exception as exc:  # MetaSchedule raises many types; the user needs the first line
        raise TuningError(f"tuning {network.name} for {device.name} failed: {one_line(exc)}") from exc
