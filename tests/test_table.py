"""The profile table: predictions from measurements, the JSON file, and saving from several processes."""

import json
import math
import multiprocessing

import numpy as np
import pytest

from hetero import cli
from hetero.table import Measurement, Profile, ProfileTable, TableError, format_table

from .conftest import ROOT

KEY = "Test CPU | {\"kind\": \"llvm\"} | tvm 0.27.0"


def _ran(batch: int, exec_s: float, h2d_s: float = 0.0, d2h_s: float = 0.0) -> Measurement:
    return Measurement(batch, [exec_s] * 3, [h2d_s] * 3, [d2h_s] * 3)


def _profile(device_key: str = KEY, network: str = "resnet-18", failed_at: int | None = None) -> Profile:
    """Per sample: 10 ms at batch 1 (8 exec + 1 + 1 copies), 5 ms at 2, 2 ms at 8."""
    measurements = [_ran(1, 0.008, 0.001, 0.001), _ran(2, 0.010), _ran(8, 0.016)]
    if failed_at is not None:
        measurements.append(Measurement(failed_at, [], [], [], error="out of memory allocating 3 GB"))
    return Profile(device_key, network, measurements, stopped="time budget 60s spent")


def test_measurement_medians_and_noise():
    m = Measurement(4, [0.010, 0.011, 0.030, 0.010, 0.012], [0.001, 0.002, 0.001], [0.0005])
    assert m.exec_median == 0.011 and m.h2d_median == 0.001 and m.d2h_median == 0.0005
    assert m.total_median == pytest.approx(0.0125)
    assert m.per_sample_s == pytest.approx(0.0125 / 4)
    assert m.noisy
    assert not _ran(4, 0.01).noisy


def test_predict_at_and_between_profiled_sizes():
    p = _profile()
    assert p.predict(0) == 0
    assert p.predict(1) == pytest.approx(0.010)
    assert p.predict(2) == pytest.approx(0.010)
    assert p.predict(8) == pytest.approx(0.016)
    # Per-sample time interpolates linearly: at 5 it is halfway between 5 ms (at 2) and 2 ms (at 8).
    assert p.predict(5) == pytest.approx(5 * 0.0035)
    assert p.predict(100) == pytest.approx(100 * 0.002), "flat per-sample time beyond the profiled sizes"
    assert p.max_batch() is None


def test_cost_curve_is_monotone_and_matches_predict():
    p = _profile()
    curve = p.cost_curve(20)
    assert len(curve) == 21 and curve[0] == 0
    assert np.all(np.diff(curve) >= 0)
    # Per-sample time falls so fast between 2 and 8 that raw predictions drop from 18 ms at 6 to 16 ms at 8.
    raw = [p.predict(s) for s in range(21)]
    assert np.allclose(curve, np.maximum.accumulate(raw))
    assert any(b < a for a, b in zip(raw, raw[1:])), "this profile's raw prediction falls somewhere"


def test_failed_size_caps_the_call_and_larger_shares_are_predicted_in_chunks():
    p = _profile(failed_at=16)
    assert p.max_batch() == 8, "only measured sizes are trusted below the failure"
    assert p.predict(8) == pytest.approx(0.016)
    assert p.predict(9) == pytest.approx(0.016 + 0.010), "a chunk of 8, then one of 1"
    assert p.predict(16) == pytest.approx(2 * 0.016)
    assert p.predict(21) == pytest.approx(2 * 0.016 + 5 * 0.0035)
    assert p.predict(40) == pytest.approx(5 * 0.016)
    curve = p.cost_curve(40)
    assert np.all(np.isfinite(curve))
    assert np.allclose(curve, np.maximum.accumulate([p.predict(s) for s in range(41)]))


def test_every_size_failed():
    p = Profile(KEY, "resnet-18", [Measurement(1, [], [], [], error="out of memory")])
    assert p.max_batch() == 0
    assert p.predict(0) == 0 and p.predict(1) == math.inf
    assert list(p.cost_curve(2)) == [0, math.inf, math.inf]


def test_measurements_are_kept_sorted():
    p = Profile(KEY, "n", [_ran(8, 0.016), _ran(1, 0.01)])
    assert [m.batch for m in p.measurements] == [1, 8]


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "table.json"
    table = ProfileTable.load(path, create=True)
    original = _profile(failed_at=16)
    table.put(original)
    table.put(_profile(network="vgg-16"))
    table.save()
    loaded = ProfileTable.load(path)
    assert loaded.get(KEY, "resnet-18") == original
    assert [p.network for p in loaded.profiles()] == ["resnet-18", "vgg-16"]
    assert loaded.get(KEY, "no-such-network") is None
    doc = json.loads(path.read_text())
    assert doc["format"] == "hetero-profile-table" and doc["version"] == 1
    assert set(doc["profiles"][KEY]) == {"resnet-18", "vgg-16"}


def test_missing_file(tmp_path):
    with pytest.raises(TableError, match="no such profile table"):
        ProfileTable.load(tmp_path / "missing.json")
    assert ProfileTable.load(tmp_path / "missing.json", create=True).profiles() == []
    assert not (tmp_path / "missing.json").exists(), "loading creates nothing"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{\"format\": \"hetero-profile-table\", ", "not valid JSON"),
        ("\x00\xff garbage", "not valid JSON"),
        ("{\"name\": \"someone else's settings\"}", "not a hetero profile table"),
        ("[1, 2, 3]", "not a hetero profile table"),
        ("{\"format\": \"hetero-profile-table\", \"version\": 99, \"profiles\": {}}", "version 99"),
        ("{\"format\": \"hetero-profile-table\", \"version\": 1, \"profiles\": {\"k\": {\"n\": {}}}}", "corrupt"),
    ],
    ids=["truncated", "binary", "foreign-object", "foreign-list", "future-version", "bad-entry"],
)
def test_unreadable_table_is_refused_and_kept(tmp_path, content, message):
    path = tmp_path / "table.json"
    path.write_text(content, encoding="latin-1")
    before = path.read_bytes()
    with pytest.raises(TableError, match=message) as info:
        ProfileTable.load(path)
    assert "\n" not in str(info.value)
    # A table loaded earlier must not overwrite the file that has since gone bad.
    table = ProfileTable(path)
    table.put(_profile())
    with pytest.raises(TableError, match=message):
        table.save()
    assert path.read_bytes() == before


def test_two_tables_on_one_file_keep_both(tmp_path):
    path = tmp_path / "table.json"
    first = ProfileTable.load(path, create=True)
    second = ProfileTable.load(path, create=True)
    first.put(_profile(device_key="gpu A"))
    second.put(_profile(device_key="gpu B"))
    first.save()
    second.save()
    assert {p.device_key for p in ProfileTable.load(path).profiles()} == {"gpu A", "gpu B"}
    assert {p.device_key for p in second.profiles()} == {"gpu A", "gpu B"}, "saving also picks up the others"


def test_saved_profile_wins_but_stale_copies_do_not(tmp_path):
    path = tmp_path / "table.json"
    seed = ProfileTable.load(path, create=True)
    seed.put(_profile(device_key="gpu A"))
    seed.save()
    stale = ProfileTable.load(path)  # holds the old gpu A profile but does not change it
    fresh = ProfileTable.load(path)
    fresh.put(Profile("gpu A", "resnet-18", [_ran(1, 0.5)]))
    fresh.save()
    stale.put(_profile(device_key="gpu B"))
    stale.save()
    assert ProfileTable.load(path).get("gpu A", "resnet-18").predict(1) == pytest.approx(0.5)
    stale.put(_profile(device_key="gpu A"))  # now this table does mean to replace it
    stale.save()
    assert ProfileTable.load(path).get("gpu A", "resnet-18").predict(1) == pytest.approx(0.010)


def _save_profiles(path, worker: int, barrier) -> None:
    table = ProfileTable.load(path, create=True)
    barrier.wait()  # every process loads before any saves, so each one's view is stale
    for n in range(5):
        table.put(_profile(device_key=f"device {worker}", network=f"net {n}"))
        table.save()


def test_processes_saving_concurrently_keep_everything(tmp_path):
    path = tmp_path / "table.json"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_save_profiles, args=(path, w, barrier)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 4
    saved = {(p.device_key, p.network) for p in ProfileTable.load(path).profiles()}
    assert saved == {(f"device {w}", f"net {n}") for w in range(4) for n in range(5)}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["table.json", "table.json.lock"], "no temp files left"


def test_format_table_shows_the_numbers(tmp_path):
    table = ProfileTable(tmp_path / "t.json")
    assert "no profiles" in format_table(table)
    noisy = Measurement(4, [0.010, 0.011, 0.030, 0.010, 0.012], [0.001], [0.001])
    table.put(Profile(KEY, "resnet-18", [*_profile(failed_at=16).measurements, noisy], stopped="time budget 60s spent"))
    text = format_table(table)
    assert KEY in text and "resnet-18" in text and "time budget 60s spent" in text
    for header in ["batch", "ms/sample", "img/s", "exec ms", "H2D ms", "D2H ms", "note"]:
        assert header in text
    assert "10.000" in text and "100.0" in text  # batch 1: 10 ms per sample, 100 img/s
    assert "8.000" in text and "1.000" in text  # its exec and copy times
    assert "500.0" in text  # batch 8: 16 ms for 8 samples
    assert "out of memory allocating 3 GB" in text and "noisy" in text


def test_slowdown_in_company_is_the_median_of_the_latest_splits(tmp_path):
    profile = _profile()
    assert profile.company_slowdown(prior=1.05) == 1.05
    predicted = profile.predict(8)  # 16 ms
    profile.record_company(2.0 * predicted, 8)
    assert profile.company_slowdown(prior=1.05) == pytest.approx(1.05), "one split does not outweigh the prior"
    for measured in [1.0, 3.0]:
        profile.record_company(measured * predicted, 8)
    assert profile.company_slowdown(prior=1.05) == pytest.approx(2.0)
    for _ in range(Profile.COMPANY_KEPT):
        profile.record_company(1.5 * predicted, 8)
    assert profile.company == pytest.approx([1.5] * Profile.COMPANY_KEPT), "only the latest splits are kept"
    profile.record_company(1.0, 0)  # an empty share says nothing
    assert len(profile.company) == Profile.COMPANY_KEPT

    table = ProfileTable.load(tmp_path / "t.json", create=True)
    table.put(profile)
    table.save()
    assert ProfileTable.load(tmp_path / "t.json").get(KEY, "resnet-18").company_slowdown(1.0) == pytest.approx(1.5)
    assert f"in company: 1.50x its prediction (median of its last {Profile.COMPANY_KEPT} splits)" in format_table(table)
    doc = json.loads((tmp_path / "t.json").read_text())
    del doc["profiles"][KEY]["resnet-18"]["company"]  # a table written before hetero learned this
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert ProfileTable.load(tmp_path / "old.json").get(KEY, "resnet-18").company == []


def test_a_device_idle_for_long_is_planned_with_the_prior_again(tmp_path):
    profile = _profile()
    predicted = profile.predict(8)
    for _ in range(Profile.COMPANY_TRUSTED):
        profile.record_company(3.0 * predicted, 8)  # learned in a busy moment
    for _ in range(Profile.IDLE_RETRY - 1):
        profile.record_idle()
    assert profile.company_slowdown(prior=1.05) == pytest.approx(3.0)
    profile.record_idle()
    assert profile.company_slowdown(prior=1.05) == 1.05, "idle long enough: measured again"

    table = ProfileTable.load(tmp_path / "t.json", create=True)
    table.put(profile)
    table.save()
    assert ProfileTable.load(tmp_path / "t.json").get(KEY, "resnet-18").idle_splits == Profile.IDLE_RETRY
    assert f"idle in the last {Profile.IDLE_RETRY} splits" in format_table(table)
    profile.record_company(1.0 * predicted, 8)  # the retry's share resets the count
    assert profile.idle_splits == 0 and profile.company_slowdown(prior=1.05) == pytest.approx(3.0)


def _write_table(path, measurement: dict) -> None:
    path.write_text(json.dumps({"format": "hetero-profile-table", "version": 1, "profiles": {KEY: {"resnet-18": {
        "stopped": None, "measurements": [{"batch": 1, "exec_s": [0.01], "h2d_s": [0.0], "d2h_s": [0.0], "error": None},
                                          {"error": None, **measurement}]}}}}))


def _timed(batch: int, exec_s: float, h2d_s: float = 0.0, d2h_s: float = 0.0) -> dict:
    return {"batch": batch, "exec_s": [exec_s] * 3, "h2d_s": [h2d_s] * 3, "d2h_s": [d2h_s] * 3}


@pytest.mark.parametrize(
    "measurement, message",
    [
        (_timed(10**12, 1e-9), "batch 1000000000000: more than 2147483647 samples in one call"),
        (_timed(2**31, 10.0), "batch 2147483648: more than 2147483647 samples in one call"),
        ({"batch": 10**40, "exec_s": [], "h2d_s": [], "d2h_s": [], "error": "out of memory"},
         "batch 1000000000000000000000000... (41 digits): more than"),
        (_timed(4, 2e-7, 2e-7, 2e-7), "batch 4: its fastest call took 6e-07 s with copies, less than the 1e-06 s"),
        (_timed(2**31 - 1, 1.0), "batch 2147483647: 4.66e-10 s per sample, less than the 1e-09 s"),
        (_timed(8, 0.01, 1e6), "batch 8: a time of 1e+06 s in h2d_s, more than a day"),
        ({"batch": 8, "exec_s": [], "h2d_s": [1e6], "d2h_s": [], "error": "timed out"}, "h2d_s, more than a day"),
    ],
    ids=["issue", "batch-past-int32", "huge-failed-batch", "faster-than-a-call", "faster-than-a-sample", "slow-copy",
         "failed-but-slow"],
)
def test_implausible_measurement_is_refused_in_one_line_naming_it(tmp_path, capsys, measurement, message):
    path = tmp_path / "table.json"
    _write_table(path, measurement)
    before = path.read_bytes()
    with pytest.raises(TableError) as info:
        ProfileTable.load(path)
    text = str(info.value)
    assert "\n" not in text and message in text
    assert text.startswith(f"{path}: implausible measurement of 'resnet-18' on {KEY!r} at batch ")
    assert cli.print_table([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "measurement",
    [_timed(2**31 - 1, 2.2), _timed(1, 1e-6), _timed(1, 4e-7, 3e-7, 3e-7), _timed(2**20, 1.1e-3), _timed(1, 86400.0),
     {"batch": 2**31 - 1, "exec_s": [], "h2d_s": [], "d2h_s": [], "error": "out of memory"}],
    ids=["largest-batch", "one-microsecond", "microsecond-with-copies", "a-nanosecond-per-sample", "one-day",
         "largest-failed-batch"],
)
def test_measurements_at_the_bounds_load(tmp_path, measurement):
    path = tmp_path / "table.json"
    _write_table(path, measurement)
    assert len(ProfileTable.load(path).get(KEY, "resnet-18").measurements) == 2


@pytest.mark.parametrize("path", sorted((ROOT / "profiles").glob("*.json")), ids=lambda p: p.name)
def test_the_repositorys_measured_tables_load(path):
    table = ProfileTable.load(path)
    assert table.profiles() and format_table(table)
    assert cli.print_table([str(path)]) == 0


def test_print_table_plots_every_profile(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from hetero import cli

    path = tmp_path / "t.json"
    table = ProfileTable(path)
    for engine in ("tvm", "onnxruntime"):
        table.put(Profile(f"CPU X | llvm | fp32 | tvm 0.27 | engine {engine} 1", "net@0",
                          [Measurement(b, [0.001 * b] * 3, [0.0] * 3, [0.0] * 3) for b in (1, 2, 4)]))
    table.save()
    assert cli.print_table([str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.print_table([str(path), "--plot", str(tmp_path / "missing" / "p.png")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --plot ")
