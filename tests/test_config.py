"""Config loading and validation: field paths, suggestions, overrides, shipped presets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from darkknowledge.config import (
    ConfigError,
    apply_overrides,
    check_config,
    config_from_dict,
    load_config,
    reference,
    reference_table,
)
from darkknowledge.schedules import Cosine

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_config_presets_exist_and_validate():
    assert len(PRESETS) >= 4
    for path in PRESETS:
        config = load_config(path)
        assert config.teacher is not None and config.students, path.name


@pytest.mark.parametrize(
    "raw, path, hint",
    [
        ({"distill": {"temprature": 2.0}}, "distill.temprature", "did you mean 'temperature'"),
        ({"train": {"max_step": 5}}, "train.max_step", "did you mean 'max_steps'"),
        ({"studnet": {"hidden": [4]}}, "studnet", "did you mean 'student'"),
        ({"stages": [{"hiden": [4]}]}, "stages.0.hiden", "did you mean 'hidden'"),
        (
            {"distill": {"divergence": "forwad_kl"}},
            "distill.divergence",
            "did you mean 'forward_kl'",
        ),
    ],
)
def test_config_unknown_key_names_path_and_suggests(raw, path, hint):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert message.startswith(f"{path}:") and hint in message


@pytest.mark.parametrize(
    "raw, path",
    [
        ({"distill": {"alpha": 1.5}}, "distill.alpha"),
        ({"distill": {"temperature": 0}}, "distill.temperature"),
        ({"distill": {"temperature": "hot"}}, "distill.temperature"),
        ({"train": {"max_steps": 0}}, "train.max_steps"),
        ({"train": {"max_steps": 2.5}}, "train.max_steps"),
        ({"train": {"progress": "yes"}}, "train.progress"),
        ({"distill": {"soft_scale": "T3"}}, "distill.soft_scale"),
        ({"distill": {"dkd_weights": [1.0]}}, "distill.dkd_weights"),
        ({"student": {"hidden": [0]}}, "student.hidden.0"),
        (
            {"distill": {"temperature": {"kind": "cosine", "start": 8, "end": -1, "steps": 10}}},
            "distill.temperature",
        ),
        (
            {"distill": {"temperature": {"kind": "cosin", "start": 8, "end": 2, "steps": 10}}},
            "distill.temperature",
        ),
        ({"data": []}, "data"),
        (
            {"distill": {"learnable_temperature": {"initial": 30.0}}},
            "distill.learnable_temperature.initial",
        ),
    ],
)
def test_config_bad_value_names_field(raw, path):
    _, errors = check_config(raw)
    assert len(errors) == 1 and errors[0].startswith(f"{path}")


def test_config_unknown_builtin_names_are_caught_by_validate():
    _, errors = check_config({"data": {"name": "digitz"}, "student": {"name": "my.module:"}})
    assert sorted(error.split(":")[0] for error in errors) == ["data.name", "student.name"]
    assert "did you mean 'digits'?" in " ".join(errors)
    _, errors = check_config({"student": {"name": "my_package.models:tiny"}})
    assert errors == []


def test_config_collects_every_problem():
    raw = {
        "distill": {"alpha": 2, "temprature": 1},
        "train": {"max_steps": -1},
        "stages": [{"name": ""}],
    }
    _, errors = check_config(raw)
    paths = sorted(error.split(":")[0] for error in errors)
    assert paths == ["distill.alpha", "distill.temprature", "stages.0.name", "train.max_steps"]


def test_config_schedules_and_learnable_temperature():
    raw = {
        "student": {"hidden": [8]},
        "distill": {
            "alpha": {"kind": "linear", "start": 0.5, "end": 0.9, "steps": 100},
            "learnable_temperature": {"initial": 3.0, "per_sample": True},
        },
        "train": {"learning_rate": "1e-3"},  # YAML 1.1 reads 1e-3 as a string; accepted as a number
    }
    config = config_from_dict(raw)
    assert config.distill.alpha["kind"] == "linear" and config.train.learning_rate == 1e-3
    assert config.distill.learnable_temperature.per_sample is True
    from darkknowledge.commands._build import temperature_from, value_or_schedule

    assert value_or_schedule({"kind": "cosine", "start": 8.0, "end": 2.0, "steps": 10}) == Cosine(
        8.0, 2.0, 10
    )
    temperature = temperature_from(config.distill, num_classes=10)
    assert (
        temperature.per_sample
        and abs(float(temperature.mlp[-1].bias.detach().sigmoid()) * 19 + 1 - 3.0) < 1e-5
    )
    both = {"distill": {"temperature": 2.0, "learnable_temperature": {}}}
    assert check_config(both)[1][0].startswith("distill.temperature:")


def test_config_is_frozen_and_input_untouched():
    raw = {
        "student": {"hidden": [8], "args": {"k": [1]}},
        "distill": {"temperature": {"kind": "constant", "value": 2.0}},
    }
    before = copy.deepcopy(raw)
    config = config_from_dict(raw)
    assert raw == before
    with pytest.raises(AttributeError):
        config.distill.alpha = 0.1
    with pytest.raises(TypeError):
        config.student.args["k"] = 2  # read-only mapping
    raw["student"]["hidden"].append(3)  # the config holds its own copy
    assert config.student.hidden == (8,)


def test_config_overrides_parse_yaml_and_copy():
    raw = {"train": {"max_steps": 5}, "stages": [{"hidden": [4]}]}
    result = apply_overrides(
        raw,
        [
            "train.max_steps=100",
            "distill.alpha=0.5",
            "stages.0.hidden=[8, 2]",
            "train.output_dir=null",
        ],
    )
    assert result == {
        "train": {"max_steps": 100, "output_dir": None},
        "distill": {"alpha": 0.5},
        "stages": [{"hidden": [8, 2]}],
    }
    assert raw == {"train": {"max_steps": 5}, "stages": [{"hidden": [4]}]}
    for bad in (["max_steps"], ["stages.3.hidden=1"], ["train.max_steps.x=1"]):
        with pytest.raises(ConfigError):
            apply_overrides(raw, bad)
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be >= 1"):
        config_from_dict(apply_overrides(raw, ["train.max_steps=0"]))


def test_config_student_and_stages_exclusive():
    _, errors = check_config({"student": {}, "stages": [{}]})
    assert errors and errors[0].startswith("student:")
    assert [
        s.hidden for s in config_from_dict({"stages": [{"hidden": [8]}, {"hidden": [2]}]}).students
    ] == [(8,), (2,)]


def test_config_reference_documents_every_field_once():
    rows = reference()
    paths = [row[0] for row in rows]
    assert len(paths) == len(set(paths))
    assert {
        "distill.temperature",
        "train.max_steps",
        "teacher.train_steps",
        "distill.learnable_temperature.initial",
    } <= set(paths)
    assert all(row[2] for row in rows)
    docs = (ROOT / "docs" / "cli.md").read_text()
    missing = [path for path in paths if f"`{path}`" not in docs]
    assert not missing, f"docs/cli.md lacks {missing}"
    # The whole table, defaults and meanings included, as generated.
    assert reference_table() in docs, (
        "docs/cli.md's reference is out of date: replace it with the output of "
        'python -c "from darkknowledge.config import reference_table; print(reference_table())"'
    )


def test_config_top_level_must_be_a_mapping(tmp_path):
    for text, kind in (("- a\n- b\n", "list"), ("2.5\n", "float")):
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"top level must be a mapping .*, got {kind}"):
            load_config(path)
    assert check_config([1])[1][0].startswith("the top level must be a mapping")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        apply_overrides([1], ["train.max_steps=1"])


def test_config_presets_are_packaged_and_found_by_name(tmp_path, monkeypatch):
    """The package's presets are the repository's configs/ (no copy to drift), by name."""
    from darkknowledge.config import presets, resolve_config

    assert presets() == [path.stem for path in PRESETS]
    for path in PRESETS:
        packaged = resolve_config(path.stem)
        assert packaged.read_bytes() == path.read_bytes(), path.name
        assert resolve_config(path.name) == packaged
    monkeypatch.chdir(tmp_path)  # anywhere, not in a clone
    assert load_config("digits_kd").student is not None
    (tmp_path / "digits_kd.yaml").write_text("student: {hidden: [3]}\n")  # a local file wins
    assert load_config("digits_kd.yaml").student.hidden == (3,)
    with pytest.raises(FileNotFoundError, match=r"no preset of that name \(presets: digits_few"):
        load_config("digits_kdd")


def test_config_presets_ship_in_the_built_package(tmp_path):
    """`pip install .` from a clone: the wheel carries the presets, and the installed package
    (not this checkout) finds them by name."""
    import shutil
    import subprocess
    import sys

    clone = tmp_path / "clone"  # built from a copy: the build leaves build/ and egg-info behind
    shutil.copytree(
        ROOT / "src",
        clone / "src",
        symlinks=True,
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    shutil.copytree(ROOT / "configs", clone / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", str(clone), "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("darkknowledge-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in (target / "darkknowledge" / "configs").iterdir()) == [
        p.name for p in PRESETS
    ]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import darkknowledge.config as c; "
        "print(c.resolve_config('digits_kd')); print(c.load_config('digits_kd').train.max_steps)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(target)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found, steps = done.stdout.split()
    assert found == str(target / "darkknowledge" / "configs" / "digits_kd.yaml")
    assert int(steps) == load_config(ROOT / "configs" / "digits_kd.yaml").train.max_steps
