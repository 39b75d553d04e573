"""dha.plots: figures are real PNG files, written by rename (no temp file left beside them)."""

from dha.plan import LayerPlan, Plan
from dha.plots import plot_allocation, plot_loss, plot_perplexity


def test_plot_allocation_writes_a_png(tmp_path):
    plan = Plan(
        [LayerPlan([[0, 1], [2]], [[0, 1, 2]]), LayerPlan([[0], [1], [2]], [[0], [1, 2]])], [3, 3], [3, 3], "dha", 0.5
    )
    path = tmp_path / "allocation.png"
    plot_allocation(plan, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["allocation.png"]  # no temp file left behind


def test_training_curves_write_pngs(tmp_path):
    log = [
        {"kind": "train", "stage": "fusion", "step": 1, "tokens": 64, "loss": 3.0, "fusion/distance": 0.5},
        {"kind": "eval", "stage": "fusion", "step": 1, "tokens": 64, "ppl": 20.0},
        {"kind": "train", "stage": "continued", "step": 1, "tokens": 128, "loss": 2.5},
        {"kind": "eval", "stage": "continued", "step": 1, "tokens": 128, "ppl": 12.0},
    ]
    plot_loss(log, str(tmp_path / "loss.png"))
    plot_perplexity(log, 10.0, str(tmp_path / "perplexity.png"))
    for name in ("loss.png", "perplexity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "perplexity.png"]


def test_retrieval_heatmaps_wrap_into_rows(tmp_path, monkeypatch):
    """Eight models at six to a row: two rows of six panels, the last four hidden; each heatmap
    shows its own grid's share found."""
    import matplotlib.figure

    import dha.plots

    grids = [
        {"lengths": [2048, 4096], "depths": [0.1, 0.9], "per_cell": 4, "haystack": "synthetic",
         "found": {"2048": [i % 5, 4], "4096": [0, 4 - i % 5]}}
        for i in range(8)
    ]  # fmt: skip
    figures = []
    monkeypatch.setattr(dha.plots, "save", lambda fig, path, **kw: figures.append(fig))
    dha.plots.plot_retrieval([f"m{i}" for i in range(8)], grids, str(tmp_path / "retrieval.png"))
    (fig,) = figures
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = fig.axes
    assert len(axes) == 12
    assert [a.get_visible() for a in axes] == [True] * 8 + [False] * 4
    assert [a.get_title() for a in axes[:8]] == [f"m{i}" for i in range(8)]
    for i, ax in enumerate(axes[:8]):
        share = ax.images[0].get_array()
        assert share.tolist() == [[(i % 5) / 4, 0.0], [1.0, (4 - i % 5) / 4]]
    assert [a.get_ylabel() for a in axes[::6]] == ["needle depth", "needle depth"]
    monkeypatch.undo()  # one model, written for real
    dha.plots.plot_retrieval(["a"], grids[:1], str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
