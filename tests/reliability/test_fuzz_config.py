"""Fuzz the config loader with hypothesis: random mappings, overrides and YAML text (or bytes)
get a valid Config or a ConfigError whose every problem names a field (or the top level, an
override, the YAML itself); never another exception."""

from __future__ import annotations

import string

import yaml
from config_walk import leaf_fields
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkknowledge.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,  # nothing written to disk: every run the same examples
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FIELDS = list(leaf_fields())
SECTIONS = sorted({field.split(".")[0] for field in FIELDS})
KEYS = sorted({part for field in FIELDS for part in field.split(".") if not part.isdigit()})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["mlp", "digits", "forward_kl", "T2", "adamw", "causal_lm", "cosine", "a:b"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)
configs = st.dictionaries(st.one_of(st.sampled_from(SECTIONS), keys), values, max_size=5)


def assert_named(errors: list[str], raw) -> None:
    """Every problem starts with a field path (a key of ``raw`` or a section), or is about
    the top level or an override."""
    heads = {str(key) for key in raw} if isinstance(raw, dict) else set()
    heads |= set(SECTIONS)
    prefixes = tuple(head + end for head in heads for end in (":", ".", " "))
    for error in errors:
        named = error.startswith(("the top level", "override ", *prefixes))
        assert named, f"{error!r} names no field of {raw!r}"


@FUZZ
@given(configs)
def test_config_from_dict_fuzz(raw):
    try:
        config = config_from_dict(raw)
    except ConfigError as error:
        assert error.errors and all(isinstance(e, str) and e for e in error.errors)
        assert_named(error.errors, raw)
        assert str(error)  # the one-line form
    else:
        assert isinstance(config, Config)


@FUZZ
@given(
    st.sampled_from(FIELDS),
    values,
    st.lists(st.text(alphabet=string.ascii_lowercase + "._=0123 -", max_size=20), max_size=3),
)
def test_apply_overrides_fuzz(field, value, junk):
    """A well-formed override sets exactly that value (compared with yaml's reading of it);
    junk gives a ConfigError naming the override."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    override = f"{field}={text}"
    try:
        result = apply_overrides({}, [override])
    except ConfigError as error:
        assert all(e.startswith("override ") for e in error.errors)
    else:
        node = result
        for part in field.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        expected = yaml.safe_load(text) if text else None
        assert node == expected or (node != node and expected != expected)  # NaN
    for item in junk:
        try:
            raw = apply_overrides({"train": {"max_steps": 3}}, [item])
        except ConfigError as error:
            assert all(e.startswith(f"override {item!r}") for e in error.errors)
            continue
        try:
            config_from_dict(raw)
        except ConfigError as error:
            assert_named(error.errors, raw)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=64), configs.map(yaml.safe_dump)))
def test_load_config_fuzz(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document, encoding="utf-8")
    try:
        config = load_config(str(path))
    except ConfigError as error:
        assert error.errors and str(error).startswith(f"{path}: ")
    else:
        assert isinstance(config, Config)
