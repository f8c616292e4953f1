import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from fixtures_study import make_study
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from ecdit_cli import cli
from ecdit_cli.numbers import sig as fmt_num
from ecdit_cli.study.collect import collect
from ecdit_cli.study.figure_style import ROUTING_COLORS
from ecdit_cli.study.figures import FIGURES, loss_curves, scaling
from ecdit_cli.study.fit import fit_power_law
from ecdit_cli.study.report import write_report

N_BOOT, SEED = 40, 1


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """The fixture study after one `ecdit plot` (the slow part, shared by the tests below)."""
    fx = make_study(tmp_path_factory.mktemp("plot") / "study")
    cli._register()
    res = CliRunner().invoke(cli.app, ["plot", str(fx.root), "--n-boot", str(N_BOOT), "--seed", str(SEED)])
    return fx, res


def test_plot_writes_png_and_svg_for_every_figure_and_both_reports(plotted):
    fx, res = plotted
    assert res.exit_code == 0, res.output
    for stem in FIGURES:
        for ext in ("png", "svg"):
            path = fx.root / "plots" / f"{stem}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert (fx.root / "plots" / "scaling_params.png").read_bytes()[:4] == b"\x89PNG"
    assert (fx.root / "report.md").is_file() and (fx.root / "report.html").is_file()
    assert (fx.root / "runs.csv").is_file(), "plot collects when the tables are missing"
    assert str(fx.root / "report.html") in res.output
    assert fx.pending in res.output and "pending" in res.output


def test_report_contains_fitted_numbers_that_match_calling_the_fitter_directly(plotted):
    fx, _ = plotted
    md = (fx.root / "report.md").read_text()
    runs = pd.read_csv(fx.root / "runs.csv")
    for routing in ("dense", "token_choice", "expert_choice"):
        done = runs[(runs["routing"] == routing) & (runs["status"] == "done")]
        for x in ("params_active", "train_flops"):
            fit = fit_power_law(done[x], done["final_val_loss"], n_boot=N_BOOT, seed=SEED)
            for k in ("E", "A", "alpha"):
                lo, hi = fit.ci[k]
                cell = f"{fmt_num(getattr(fit, k))} [{fmt_num(lo)}, {fmt_num(hi)}]"
                assert cell in md, (routing, x, k, cell)


def test_report_header_names_running_failed_and_pending_runs_with_the_error(plotted):
    fx, _ = plotted
    md = (fx.root / "report.md").read_text()
    header = md.split("## Figures")[0]
    assert "Runs done: 10 of 13" in header
    assert f"{fx.running}: interrupted at step 100 of 200" in header
    assert f"{fx.pending}: pending" in header
    assert re.search(rf"{fx.failed}: FAILED at step 120: non-finite loss", header)
    assert "truncated line" in header


def test_report_has_holdout_effective_multiplier_and_speedup_tables(plotted):
    fx, _ = plotted
    md = (fx.root / "report.md").read_text()
    holdout = md.split("## Held-out check")[1].split("## MoE vs dense")[0]
    assert re.search(r"\| dense \| [0-9.e+]+ \| [0-9.]+ \| [0-9.]+ \| [+-][0-9.]+% \|", holdout)
    assert "the check needs at least 4" in holdout  # TC and EC have 3 sizes done
    moe = md.split("## MoE vs dense")[1]
    assert fx.run_ids[("S", "expert_choice")] in moe
    assert re.search(r"\| S-ec-e8-s0 \| S \| S-dense-s0 \| [0-9.]+ \| [0-9.]+% \| [0-9.]+% \|", moe)
    assert "—" not in md.split("| S-ec-e8-s0 | expert_choice |")[1].split("\n")[0]


def test_report_html_is_self_contained(plotted):
    fx, _ = plotted
    page = (fx.root / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<table>" in page and "<style>" in page


def test_report_on_a_study_with_only_one_size_says_why_there_is_no_fit(tmp_path):
    fx = make_study(tmp_path / "one", sizes=("S",), extras=False)
    files = write_report(fx.root, n_boot=5)
    md = files.markdown.read_text()
    assert "no fit: 1 size(s) done; a saturating power law needs at least 3" in md
    assert "not possible: 1 size(s) done" in md
    assert "Every run of the study is done." in md
    assert (fx.root / "plots" / "scaling_params.svg").is_file()


def test_plot_no_collect_without_tables_exits_2_with_one_line(tmp_path, capsys):
    fx = make_study(tmp_path / "s", sizes=("S",), extras=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["plot", str(fx.root), "--no-collect"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ecdit collect" in err


def test_routings_have_the_same_colour_in_every_figure(tmp_path):
    fx = make_study(tmp_path / "s", sizes=("S", "M", "L"), extras=False)
    data = collect(fx.root, write=False)
    figs = [loss_curves(data, "step"), scaling(data, "params_active", {})]
    allowed = {to_hex(c) for c in ROUTING_COLORS.values()} | {to_hex("0.3")}
    for fig in figs:
        colours = {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()}
        colours |= {to_hex(c) for ax in fig.axes for coll in ax.collections for c in coll.get_facecolor()}
        assert colours and colours <= allowed, colours
        plt.close(fig)


def test_the_report_fits_chinchilla_on_validation_curves_and_recovers_a_known_law():
    import numpy as np
    import pandas as pd

    from ecdit_cli.study.collect import CollectResult
    from ecdit_cli.study.findings import analyse

    E, A, alpha, B, beta = 0.2, 30.0, 0.35, 10.0, 0.3
    rng = np.random.default_rng(0)
    runs, curves = [], []
    for i, n in enumerate([1e5, 3e5, 1e6, 3e6]):
        run_id = f"s{i}-ec"
        runs.append({"run_id": run_id, "size": f"s{i}", "routing": "expert_choice", "status": "done",
                     "params_active": n, "params_total": 2 * n, "flops_per_image": 2 * 64 * n,
                     "final_val_loss": np.nan, "step": 1000, "train_flops": 1.0})
        for step in range(100, 1001, 100):
            d = step * 32.0
            loss = (E + A / n**alpha + B / d**beta) * np.exp(rng.normal(0, 0.003))
            curves.append({"run_id": run_id, "step": step, "images_seen": d, "flops": 1.0, "metric": "val_loss",
                           "value": loss})
    data = CollectResult(study_dir=Path("."), runs=pd.DataFrame(runs), curves=pd.DataFrame(curves),
                         axes=["size", "routing"], warnings=[], missing=[], is_study=True)
    an = analyse(data, n_boot=20)
    (series, res), = an.chinchilla.items()
    assert not isinstance(res, str), res
    assert res.fit.alpha == pytest.approx(alpha, abs=0.05) and res.fit.beta == pytest.approx(beta, abs=0.05)
    assert res.fit.E == pytest.approx(E, rel=0.25)
    opt = res.optimal
    assert np.allclose(opt.C, opt.N_opt * opt.D_opt * (3 * 2 * 64)), "budgets are k N D with k from accounting"
    assert opt.a == pytest.approx(beta / (alpha + beta), abs=0.06)
