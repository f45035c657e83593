"""The signal-gap study and the ``dk signal-gap`` command."""

import itertools

import pytest
import torch

import darkknowledge as dk
from darkknowledge.analysis.signal_gap import default_sweep_temperatures, draw_logits, format_table
from darkknowledge.cli import main


def _reference_grad_norm(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Naive float64 gradient of the batch-mean KL(p || q): (q - p) / (T · batch)."""
    p = torch.softmax(teacher / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    return float(((q - p) / (temperature * student.shape[0])).norm())


def test_ratio_is_t_squared_and_values_match_a_float64_reference():
    gaps = dk.analysis.signal_gap(classes=50, temperatures=(1, 2.5, 5), seed=3, batch_size=4)
    student, teacher = draw_logits(50, batch_size=4, seed=3)
    assert [gap.temperature for gap in gaps] == [1.0, 2.5, 5.0]
    for gap in gaps:
        t2 = gap.temperature**2
        assert gap.ratio == pytest.approx(t2, rel=1e-5)
        assert gap.scaled_loss == pytest.approx(t2 * gap.soft_loss, rel=1e-5)
        reference = _reference_grad_norm(student, teacher, gap.temperature)
        assert gap.grad_norm == pytest.approx(reference, rel=1e-4)
    # The gap itself: unscaled, the gradient shrinks with T; scaled, it stays the same order.
    assert gaps[2].grad_norm < gaps[0].grad_norm / 10
    assert gaps[0].grad_norm / 2 < gaps[2].scaled_grad_norm < gaps[0].grad_norm * 2


def test_seed_makes_it_deterministic_and_zero_mean_centres_rows():
    first = dk.analysis.signal_gap(classes=20, temperatures=(2,), seed=1, batch_size=2)
    assert first == dk.analysis.signal_gap(classes=20, temperatures=(2,), seed=1, batch_size=2)
    assert first != dk.analysis.signal_gap(classes=20, temperatures=(2,), seed=2, batch_size=2)
    student, teacher = draw_logits(20, batch_size=2, seed=1)
    for logits in (student, teacher):
        torch.testing.assert_close(logits.mean(-1), torch.zeros(2, dtype=torch.float64))
    raw_student, _ = draw_logits(20, batch_size=2, seed=1, zero_mean=False)
    assert float(raw_student.mean(-1).abs().max()) > 1e-3
    # Softmax ignores the shift, so the measured gradient does not change.
    uncentred = dk.analysis.signal_gap(
        classes=20, temperatures=(2,), seed=1, batch_size=2, zero_mean=False
    )
    assert uncentred[0].grad_norm == pytest.approx(first[0].grad_norm, rel=1e-5)


def test_sweep_default_range_and_high_temperature_approximation():
    default = default_sweep_temperatures()
    assert default[0] == pytest.approx(1.0) and default[-1] == pytest.approx(100.0)
    assert all(
        b / a == pytest.approx(default[1] / default[0]) for a, b in itertools.pairwise(default)
    )
    sweep = dk.analysis.gradient_norm_sweep(
        temperatures=(1.0, 10.0, 100.0), classes=200, batch_size=4
    )
    assert (
        len(sweep.unscaled)
        == len(sweep.scaled)
        == len(sweep.approximation)
        == len(sweep.temperatures)
    )
    relative_error = abs(sweep.unscaled[-1] / sweep.approximation[-1] - 1)
    assert relative_error < 1e-3  # at T = 100
    assert abs(sweep.unscaled[0] / sweep.approximation[0] - 1) > 0.05  # not at T = 1
    for temperature, unscaled, scaled in zip(sweep.temperatures, sweep.unscaled, sweep.scaled):
        assert scaled == pytest.approx(temperature**2 * unscaled, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes must be an integer >= 2, got classes=1"),
        ({"temperatures": (1, 0)}, "temperatures must all be finite and > 0, got 0"),
        ({"temperatures": ()}, "temperatures must not be empty"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got batch_size=0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dk.analysis.signal_gap(**kwargs)


def test_table_has_the_columns_and_ratio_line():
    gaps = dk.analysis.signal_gap(classes=30, temperatures=(1, 5), batch_size=2)
    table = format_table(gaps, classes=30, batch_size=2, seed=0)
    header = table.splitlines()[2]
    for column in ("T=1 unscaled", "T=5 unscaled", "T=5 scaled"):
        assert column in header
    assert "T=1 scaled" not in header
    assert "scaled / unscaled gradient norm = 25.0000 (T^2 = 25)" in table


def test_cli_prints_the_table_and_writes_a_png(tmp_path, capsys):
    plot = tmp_path / "gap.png"
    argv = [
        "signal-gap",
        "--classes",
        "100",
        "--temperatures",
        "1",
        "5",
        "--points",
        "5",
        "--plot",
        str(plot),
    ]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    assert "T=5 scaled" in out and "(T^2 = 25)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["gap.png"]  # no temporary file left behind


def test_cli_without_plot_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["signal-gap", "--classes", "10"]) == 0
    assert "T=1 unscaled" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--classes", "1"], "--classes must be >= 2, got 1"),
        (["--temperatures", "1", "0"], "--temperatures must all be finite and > 0, got 0"),
        (["--temperatures", "-2"], "--temperatures must all be finite and > 0, got -2"),
        (["--plot", "out.jpg"], "--plot must end in .png, .pdf or .svg"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["signal-gap", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_unparsable_flag_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["signal-gap", "--classes", "many"])
    assert exit_info.value.code == 2


def test_analysis_is_pure_math_and_plots_without_a_cli_or_cycles():
    """The command line lives in darkknowledge.commands; analysis modules import no argparse,
    define no command and do not import each other in a circle."""
    import ast
    from pathlib import Path

    folder = Path(dk.analysis.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        relative = {
            (n.module or "").split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.level == 1
        }
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "argparse" not in names, path.name
        assert not {"add_arguments", "run"} & functions, path.name
        imports[path.stem] = relative
    for module, targets in imports.items():
        for target in targets:
            assert module not in imports.get(target, set()), f"{module} <-> {target}"
