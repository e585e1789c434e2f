"""MetaSchedule tuning on request: records next to the table, applied by later compiles, used where faster.

A one-convolution ONNX network keeps the real tuning (builder and runner processes included) to a few
seconds on 2 cores.
"""

import dataclasses
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir

import hetero
from hetero import tune
from hetero.engines import load_engine
from hetero.engines.tvm import TVMEngine
from hetero.schedules.cpu.pipeline import fusion_passes
from hetero.session import infer
from hetero.table import ProfileTable
from hetero.tune import Tuning, TuningError, tuning_for

from .test_models import tiny_onnx

TUNED_BATCH = 2


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny network, its table path and its tuning, after 4 real MetaSchedule trials."""
    folder = tmp_path_factory.mktemp("tune")
    tiny_onnx(folder / "tiny.onnx")
    network = hetero.get_network(str(folder / "tiny.onnx"))
    cpu = hetero.parse_devices("cpu")[0]
    table = folder / "t.json"
    tuning = tuning_for(table, network, cpu, TUNED_BATCH)
    assert not tuning.has_records()
    tune.tune(network, cpu, tuning, trials=4)
    return network, cpu, table, tuning


def test_records_land_next_to_the_table_and_name_their_content(tuned):
    network, cpu, table, tuning = tuned
    assert tuning.records.parent == table.parent / "t.tuning" and tuning.records.name.endswith(f"-b{TUNED_BATCH}")
    assert tuning.has_records()
    assert tuning.digest() == tuning_for(table, network, cpu, TUNED_BATCH).digest()
    assert not tuning_for(table, network, cpu, TUNED_BATCH + 1).has_records(), "records belong to one batch"


def test_a_later_compile_schedules_functions_from_the_records(tuned):
    network, cpu, _, tuning = tuned
    with cpu.target, s_tir.meta_schedule.database.JSONDatabase(work_dir=str(tuning.records)):
        fused = tvm.transform.Sequential(fusion_passes(cpu.target))(tune.static_module(network, TUNED_BATCH))
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
    scheduled = [name for name, f in applied.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled", False)]
    assert scheduled, "no function was taken from the tuning records"


@pytest.mark.parametrize("tuned_is_faster", [True, False])
def test_the_tuned_module_runs_only_where_it_is_faster(tuned, monkeypatch, tmp_path, tuned_is_faster):
    network, cpu, shared_table, tuning = tuned
    table = tmp_path / shared_table.name  # a table of this test's own, beside a copy of the records
    shutil.copytree(tuning.records.parent, tmp_path / tuning.records.parent.name)
    monkeypatch.setattr(TVMEngine, "time_module", lambda self, use_tuned: 1.0 if use_tuned == tuned_is_faster
                        else 2.0)
    inputs = network.random_input(5, seed=3)  # two whole chunks of the tuned batch and one sample
    reference, _ = load_engine(network, cpu).infer(inputs)
    report = infer(network, [cpu], inputs=inputs, table=table, profile_batches=[1, 2], progress=False,
                   tune_batch=TUNED_BATCH)
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)
    keys = [p.device_key for p in ProfileTable.load(table).profiles()]
    tuned_key = f"tuned at batch {TUNED_BATCH}, records {tuning.digest()}"
    assert any(tuned_key in key for key in keys) == tuned_is_faster


def test_tuning_is_refused_where_no_device_can_be_tuned(tuned):
    network, cpu, table, _ = tuned
    opencl_like = dataclasses.replace(cpu, name="igpu", kind="opencl")
    with pytest.raises(TuningError, match="CPU and CUDA devices"):
        tune.tune(network, opencl_like, Tuning(table.parent / "x", 2), trials=1)


def test_records_that_cannot_be_used_leave_the_run_untuned(tuned, tmp_path, caplog):
    network, cpu, shared_table, tuning = tuned
    table = tmp_path / shared_table.name
    broken = tmp_path / tuning.records.parent.name / tuning.records.name
    shutil.copytree(tuning.records, broken)
    (broken / "database_tuning_record.json").write_text("[not json")
    inputs = network.random_input(3, seed=1)
    report = infer(network, [cpu], inputs=inputs, table=table, profile_batches=[1, 2], progress=False,
                   tune_batch=TUNED_BATCH)
    reference, _ = load_engine(network, cpu).infer(inputs)
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)
    assert any("cannot be used" in r.getMessage() for r in caplog.records)
    assert all("tuned at batch" not in p.device_key for p in ProfileTable.load(table).profiles())


def test_cuda_tasks_are_the_kernels_each_call_runs():
    from tvm.s_tir import meta_schedule as ms

    from hetero.schedules.cuda.pipeline import fused_module

    from .test_schedules_cuda import CUDA_TARGET

    network = hetero.get_network("squeezenet_v1.1")
    gpu = hetero.Device("gpu0", "cuda", 0, "a CUDA GPU", CUDA_TARGET)
    module = tune.tuning_tasks_module(network, gpu, TUNED_BATCH)
    assert "main_transform_params" not in [gv.name_hint for gv in module.functions]
    names = [task.task_name for task in ms.relax_integration.extract_tasks(module, CUDA_TARGET)]
    assert sum("conv2d" in name for name in names) >= 10
    everything = fused_module(tune.static_module(network, TUNED_BATCH), CUDA_TARGET)
    all_names = [task.task_name for task in ms.relax_integration.extract_tasks(everything, CUDA_TARGET)]
    assert set(names) < set(all_names)  # the kernels preparing the weights (run once) are left out
