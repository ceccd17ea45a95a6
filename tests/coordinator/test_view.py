"""How a federation shows its progress: the live view on a terminal, a log line per round
anywhere else, nothing but warnings with ``--quiet``; tables as wide as their content when the
output is not a terminal."""

from __future__ import annotations

import io
import logging

from rich.console import Console
from rich.table import Table

from cahfp.cli.options import output_console
from cahfp.config import load_config
from coordinator.engine import RoundRecord
from coordinator.view import ProgressView


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(rnd, 0.8125, 0.5, 1.5, 4)


def _run(view: ProgressView) -> None:
    view.start(_record(0))
    view.event("round_start", {"selected": ["a", "b"]})
    view.event("round_end", {"record": _record(1)})
    view.stop()


def test_a_line_per_round_where_stderr_is_not_a_terminal(caplog):
    cfg = load_config(None, {})
    with caplog.at_level(logging.INFO, logger="cahfp.federation"):
        view = ProgressView(cfg, Console(file=io.StringIO()), quiet=False)
        _run(view)
    assert view.progress is None
    assert "round 1: accuracy 0.8125, 4 updates, 1.5 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cahfp.federation"):
        _run(ProgressView(cfg, Console(file=io.StringIO()), quiet=True))
    assert caplog.text == ""


def test_the_live_view_on_a_terminal(caplog):
    out = io.StringIO()
    view = ProgressView(load_config(None, {}), Console(file=out, force_terminal=True), False)
    with caplog.at_level(logging.INFO, logger="cahfp.federation"):
        _run(view)
    assert view.progress is not None and "round 1" not in caplog.text
    assert "rounds" in out.getvalue() and "accuracy 0.8125" in out.getvalue()


def test_tables_are_not_cut_when_the_output_is_not_a_terminal(capsys):
    table = Table(title="runs")
    for c in ("run", "strategy", "final acc", "FLOPs vs dense", "up MB/client-round"):
        table.add_column(c)
    table.add_row("a-run-with-a-long-name", "heterofl", "0.8713", "0.60", "0.123")
    output_console().print(table)
    out = capsys.readouterr().out
    assert "heterofl" in out and "up MB/client-round" in out and "…" not in out


def test_plots_carry_the_setup_a_legend_on_every_panel_and_whole_rounds(monkeypatch, tmp_path):
    from coordinator import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    cfg = load_config(None, {"federation.strategy": "heterofl"})
    client = {"status": "ok", "bytes_up": 1e6, "keep_achieved": 0.5, "keep_target": 0.6}
    records = [{"round": r, "accuracy": 0.1 * (r + 1), "clients": [] if r == 0 else
                [{**client, "client_id": "client-000"}]} for r in range(5)]  # fmt: skip
    plots.plot_run(tmp_path, records, plots.run_title(cfg), "heterofl")
    plots.plot_compare({"a": records, "b": records}, tmp_path / "c.png", "vgg11 x0.25 on fmnist")
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 5 and all(ax.get_legend() is not None for ax in axes)
    assert axes[0].get_title() == "federation: heterofl, vgg11 x0.25 on fmnist (dirichlet:0.5)"
    assert figures[-1]._suptitle.get_text() == "vgg11 x0.25 on fmnist"
    for ax in (axes[0], axes[2], axes[3]):  # the round axes
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = [t.get_text() for t in axes[2].get_legend().get_texts()]
    assert labels == ["client-000", "client-000 target"]  # the target keep is drawn
