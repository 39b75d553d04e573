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
