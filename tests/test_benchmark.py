"""The benchmark command: every device alone, then the split, written to a markdown file."""

from .conftest import SMALL_NETWORK, run_script


def test_benchmark_prints_and_records_every_device_and_the_split(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    result = run_script(
        "-m hetero.benchmark", "--network", SMALL_NETWORK, "--device", "cpu", "--batch", "2",
        "--profile-batches", "1,2", "--repeats", "1", "--warmup", "0", "--no-torch",
        "--table", str(tmp_path / "t.json"), "--markdown", str(markdown), "--machine", "test-box",
    )
    assert result.returncode == 0, result.stderr
    text = markdown.read_text()
    assert "### test-box" in text and f"#### {SMALL_NETWORK}, batch 2, `cpu`, fp32" in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu ") or line.startswith("| split ")]
    assert len(rows) == 2
    assert "split/ideal" in text and "split/best-single" in text
    assert "split/ideal" in result.stdout
