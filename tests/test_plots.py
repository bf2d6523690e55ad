"""label_points keeps labels apart even when the points crowd together."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from labs_lib.plots import label_points, overlapping_labels  # noqa: E402


def test_crowded_points_get_labels_that_do_not_overlap():
    xs, ys = [100.0, 100.5, 101.0, 101.2, 150.0, 270.0], [14.10, 14.11, 14.12, 14.13, 13.0, 12.9]
    labels = ["GGUF Q4_K_M", "AWQ INT4 g64", "GPTQ INT4 g64", "NVFP4 W4A16", "FP8 W8A8", "BF16"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o")
    plain = [ax.annotate(t, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
             for x, y, t in zip(xs, ys, labels)]
    assert overlapping_labels(fig, plain)  # the naive labels do collide here
    for t in plain:
        t.remove()
    texts = label_points(ax, xs, ys, labels)
    assert [t.get_text() for t in texts] and not overlapping_labels(fig, texts)
    plt.close(fig)
