"""Pictures of a profile table: rate (img/s, or samples/s for a text network) against batch size, one line per
device, engine and network.

matplotlib is an optional extra (``pip install 'hetero[plot]'``), imported only here.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HeteroError
from .table import KEY_FIELDS, ProfileTable, engine_of


def _label(device_key: str, network: str) -> str:
    hardware, precision = device_key.split(KEY_FIELDS)[0], device_key.split(KEY_FIELDS)[2]
    return f"{network.split('@')[0]}: {hardware} {precision}, {engine_of(device_key)}"


def plot_table(table: ProfileTable, path: Path) -> None:
    """Draw every profile of `table` (its rate, img/s or samples/s, against batch size, sizes that failed left out)
    into `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        from matplotlib import pyplot
    except ImportError:
        raise HeteroError("--plot needs matplotlib: pip install 'hetero[plot]'") from None
    profiles = table.profiles()
    if not profiles:
        raise HeteroError(f"{table.path}: no profiles to plot")
    figure, axes = pyplot.subplots(figsize=(9, 5.5))
    for profile in profiles:
        ran = [m for m in profile.measurements if m.error is None]
        axes.plot([m.batch for m in ran], [m.batch / m.total_median for m in ran], marker="o", markersize=3,
                  label=_label(profile.device_key, profile.network))
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("batch size (samples per call)")
    axes.set_ylabel(f"{' or '.join(sorted({p.unit for p in profiles}))}, copies included")
    axes.set_title(f"profiles in {table.path.name}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise HeteroError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        pyplot.close(figure)
