"""Labels for scatter plots that never overlap: one column of labels beside the data, each joined to its point."""

from __future__ import annotations

__all__ = ["label_points", "overlapping_labels"]


def label_points(ax, xs: list[float], ys: list[float], labels: list[str], fontsize: int = 7) -> list:
    """Write `labels` in a column right of the points, spread evenly over the y range in the order of the points'
    y values, each with a thin line to its point. Returns the text artists."""
    import numpy as np

    order = sorted(range(len(xs)), key=lambda i: ys[i])
    log_y = ax.get_yscale() == "log"
    lo, hi = min(ys), max(ys)
    if log_y:
        slots = np.geomspace(lo, hi, len(xs)) if len(xs) > 1 else [lo]
    else:
        slots = np.linspace(lo, hi, len(xs)) if len(xs) > 1 else [lo]
    span = max(xs) - min(xs) or abs(max(xs)) or 1.0
    x_text = max(xs) + 0.15 * span
    texts = [ax.annotate(labels[i], (xs[i], ys[i]), xytext=(x_text, y), textcoords="data", fontsize=fontsize,
                         va="center", arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"})
             for i, y in zip(order, slots)]
    ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.75 * span)
    return texts


def overlapping_labels(fig, texts: list) -> list[tuple[str, str]]:
    """Pairs of texts whose drawn text boxes overlap (after drawing `fig`); an annotation's line is not counted."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
