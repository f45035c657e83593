"""Every config field, found by walking the schema: a wrong type and an out-of-range value are
refused by ``config_from_dict``, ``load_config``, ``dk validate`` and ``dk distill``, each
naming the field."""

from __future__ import annotations

import pytest
import yaml
from catalogue import dk
from config_walk import about, field_rows, leaf_fields, raw_with

from darkknowledge.config import ConfigError, load_config

ROWS = field_rows()
BAD_VALUES = [(field, probe.value) for field, *probes in ROWS for probe in probes if probe]


def test_config_walk_finds_every_section():
    fields = list(leaf_fields())
    for expected in ("task", "teacher.train_steps", "stages.0.hidden", "data.batch_size",
                     "distill.learnable_temperature.initial", "train.output_dir"):  # fmt: skip
        assert expected in fields
    assert len(fields) == len(set(fields)) >= 60


@pytest.mark.parametrize(("field", "wrong", "out"), ROWS, ids=[row[0] for row in ROWS])
def test_config_field_refuses_a_wrong_type(field, wrong, out):
    # No field takes everything: each refuses a list, a string or a bool, naming itself.
    assert wrong is not None, f"{field} accepts [1, 2], 'x' and True alike"
    assert about(field, wrong.errors)
    if out is not None:
        assert about(field, out.errors)


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_config_field_bad_value_in_yaml_and_cli(tmp_path, monkeypatch, field, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw_with(field, value)))
    with pytest.raises(ConfigError) as raised:
        load_config("config.yaml")
    assert about(field, tuple(raised.value.errors))
    validate = dk("validate", "config.yaml")
    assert validate.code == 2
    lines = validate.stderr.splitlines()
    assert lines[0].startswith("config.yaml: ") and "Traceback" not in validate.stderr
    assert any(line.strip().startswith(f"{field}:") or line.strip().startswith(f"{field} (")
               for line in lines[1:])  # fmt: skip
    distill = dk("distill", "config.yaml")
    assert distill.code == 2
    assert distill.stderr.count("\n") == 1  # one line
    assert distill.stderr.startswith("dk distill: error: config.yaml: ")
    assert field in distill.stderr
