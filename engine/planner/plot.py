"""Pictures of a plan: each stage's memory as stacked bars, the budget line, DynamiCrafter's run beside it.

matplotlib is an optional extra (``pip install engine[plot]``). It is imported only when a picture
is drawn, and only through its Agg canvas: no window, no change to pyplot's global backend.

Example:
    >>> card = catalog_device("rtx-4090-laptop")
    >>> plan = make_plan(spec, 320, 512, 16, card)
    >>> plot_plan(plan, "plan.png", reference=make_plan(spec, 320, 512, 16, card, force="reference"))
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from ..device.spec import format_bytes
from ..errors import InvalidArgument
from ..plan.plan import Plan, StagePlan

# (part, the StagePlan.terms it adds up, colour), bottom of the bar first
PARTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("context", ("cuda_context",), "#8c8c8c"),
    ("weights", ("weights",), "#4c72b0"),
    ("carried", ("carried",), "#55a868"),
    ("activations", ("activations",), "#dd8452"),
    ("cache", ("autocast_cache", "cached_blocks", "allocator"), "#8172b3"),
)
FORMATS = (".png", ".svg", ".pdf")
_GIB, _MIB = 1 << 30, 1 << 20


def part_bytes(stage: StagePlan) -> dict[str, int]:
    """``stage.peak_bytes`` split into the parts drawn (``other``: terms no part names, if any)."""
    parts = {name: sum(int(stage.terms.get(t, 0)) for t in terms) for name, terms, _ in PARTS}
    other = int(stage.peak_bytes) - sum(parts.values())
    return {**parts, "other": other} if other > 0 else parts


def require_matplotlib(argument: str = "path"):
    """matplotlib's ``Figure`` and Agg canvas, or one sentence naming ``argument`` and the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(f"`{argument}` draws with matplotlib, which is not installed; install it "
                                  "with `pip install engine[plot]`.") from None
    return Figure, FigureCanvasAgg


def check_plot_path(path, argument: str = "path") -> Path:
    """``path`` as a :class:`Path` if its extension is a format the picture is written in."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise InvalidArgument(f"`{argument}` {str(path)!r} must end in {', '.join(FORMATS)}; "
                              f"e.g. {path.with_suffix('.png').name}.")
    return path


def plot_plan(plan: Plan, path, *, reference: Plan | None = None, argument: str = "path",
              dpi: int = 120) -> Path:
    """Draw ``plan`` (and ``reference`` beside it, stage by stage) into ``path`` (.png, .svg, .pdf).

    Args:
        plan: the plan to draw.
        path: where to write the picture; its folder must exist.
        reference: another plan of the same stages to pair with it, typically
            ``make_plan(..., force="reference")`` (DynamiCrafter's own run); drawn hatched.
        argument: how errors name ``path`` (``--plot`` on the command line).
        dpi: resolution of raster formats.

    Returns:
        The path written.
    """
    path = check_plot_path(path, argument)
    Figure, FigureCanvasAgg = require_matplotlib(argument)
    fig = Figure(figsize=(11.5, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pairs = [(plan, "engine's plan")] + ([(reference, "DynamiCrafter's run")] if reference else [])
    unit, top = _scale(plan, [p for p, _ in pairs])
    _bars(ax, pairs, unit, plan.budget_bytes)
    _budget(ax, plan, unit, top)
    _labels(fig, ax, plan, reference, unit)
    fig.savefig(path, dpi=dpi)
    return path


def _scale(plan: Plan, plans: list[Plan]) -> tuple[tuple[int, str], float]:
    """(bytes per unit, unit name) and the top of the y axis in bytes. A budget far above every
    bar is left off the scale (and named in a note) so the bars stay readable."""
    tallest = max(p.peak_bytes for p in plans)
    top = max(tallest, plan.budget_bytes) * 1.15
    if plan.budget_bytes > 4 * tallest:
        top = tallest * 1.25
    return ((_GIB, "GiB") if top >= _GIB else (_MIB, "MiB")), top


def _bars(ax, pairs, unit, budget: int) -> None:
    stages = [s.name for s in pairs[0][0].stages]
    width = 0.8 / len(pairs)
    for i, (p, _) in enumerate(pairs):
        by_name = {s.name: s for s in p.stages}
        xs = [k + (i - (len(pairs) - 1) / 2) * width for k in range(len(stages))]
        bottoms = [0.0] * len(stages)
        split = [part_bytes(by_name[n]) if n in by_name else {} for n in stages]
        for name, colour in [(n, c) for n, _, c in PARTS] + [("other", "#cccccc")]:
            heights = [parts.get(name, 0) / unit[0] for parts in split]
            if any(heights):
                ax.bar(xs, heights, width * 0.92, bottom=bottoms, color=colour, alpha=1.0 if i == 0 else 0.55,
                       hatch=None if i == 0 else "//", edgecolor="white", linewidth=0.6)
                bottoms = [b + h for b, h in zip(bottoms, heights)]
        for x, name, height in zip(xs, stages, bottoms):
            over = name in by_name and by_name[name].peak_bytes > budget
            ax.annotate(f"{height:.1f}" if height >= 10 else f"{height:.2f}", (x, height),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        color="#c0392b" if over else "#333333", fontweight="bold" if over else "normal")
    ax.set_xticks(range(len(stages)), stages)


def _budget(ax, plan: Plan, unit, top: float) -> None:
    label = f"budget {format_bytes(plan.budget_bytes)}"
    if plan.device.total_bytes <= top:
        ax.axhline(plan.device.total_bytes / unit[0], color="#555555", linestyle=":", linewidth=1.2,
                   label=f"card {format_bytes(plan.device.total_bytes)} (budget + reserve)")
    if plan.budget_bytes <= top:
        ax.axhline(plan.budget_bytes / unit[0], color="#c0392b", linestyle="--", linewidth=1.4, label=label)
    else:
        ax.text(0.99, 0.97, f"{label} (above the chart)", transform=ax.transAxes, ha="right", va="top",
                color="#c0392b", fontsize=9)
    ax.set_ylim(0, top / unit[0])
    ax.set_ylabel(f"device memory at the stage's peak ({unit[1]})")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _labels(fig, ax, plan: Plan, reference: Plan | None, unit) -> None:
    from matplotlib.patches import Patch

    w = plan.workload
    verdict = lambda p: "fits" if p.fits else "does not fit"  # noqa: E731
    title = (f"{w.config} at {w.height}x{w.width}x{w.frames}, {w.steps} steps on {plan.device.name}\n"
             f"engine's plan: peak {format_bytes(plan.peak_bytes)}, {verdict(plan)}")
    if reference is not None:
        title += f"   |   DynamiCrafter's run: peak {format_bytes(reference.peak_bytes)}, {verdict(reference)}"
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=c, label=n) for n, _, c in PARTS]
    handles += ax.get_legend_handles_labels()[0]  # the budget and card lines
    if reference is not None:
        handles += [Patch(facecolor="white", edgecolor="#555555", label="engine's plan (solid)"),
                    Patch(facecolor="#dddddd", edgecolor="#555555", hatch="//",
                          label="DynamiCrafter's run (hatched)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    notes = [f"engine's plan: {plan.settings.describe()}"]
    if reference is not None:
        notes.append(f"DynamiCrafter's run: {reference.settings.describe()}")
    fig.supxlabel("\n".join(textwrap.fill(n, 150) for n in notes), fontsize=7, color="#444444")


__all__ = ["PARTS", "check_plot_path", "part_bytes", "plot_plan", "require_matplotlib"]
