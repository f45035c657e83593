"""Bad configs, met by ``load_config`` and by the ``dk`` commands (run in-process).

Each YAML text below is tried twice: through :func:`darkknowledge.config.load_config` and
through ``dk distill`` (one line on stderr, exit code 2). The per-field checks (every field of
the schema, wrong type and out of range) are generated in :mod:`config_walk`.
"""

from __future__ import annotations

from catalogue import Case, dk, write

from darkknowledge.config import load_config

GOOD = "student: {hidden: [8]}\nteacher: {hidden: [16], train_steps: 1}\n"
NESTED = "a: " + "[" * 1000 + "]" * 1000 + "\n"
ALIAS_BOMB = "student:\n  args:\n" + "".join(
    f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else ', '.join(['1'] * 10)}]\n"
    for i in range(7)
)

# (what, YAML text or bytes, text the error must contain)
YAML_CASES: list[tuple[str, str | bytes, str]] = [
    (
        "unknown key in a section (`distill.temprature`)",
        "distill: {temprature: 2.0}\n",
        "distill.temprature",
    ),
    ("unknown section (`optimiser:`)", "optimiser: {name: adam}\n", "optimiser"),
    ("a key that is not a string (`1: 2`)", "1: 2\n", "1: unknown key"),
    ("a section that is not a mapping (`train: 5`)", "train: 5\n", "train"),
    ("wrong type (`train.max_steps: ten`)", "train: {max_steps: ten}\n", "train.max_steps"),
    ("out of range (`distill.alpha: 1.5`)", "distill: {alpha: 1.5}\n", "distill.alpha"),
    ("NaN (`distill.temperature: .nan`)", "distill: {temperature: .nan}\n", "distill.temperature"),
    (
        "unknown schedule kind",
        "distill: {temperature: {kind: cosin, start: 4, end: 1, steps: 10}}\n",
        "distill.temperature",
    ),
    (
        "schedule leaving the range (alpha 0.5 -> 2)",
        "distill: {alpha: {kind: linear, start: 0.5, end: 2.0, steps: 10}}\n",
        "distill.alpha",
    ),
    ("both `student` and `stages`", "student: {hidden: [8]}\nstages: [{hidden: [8]}]\n", "student"),
    (
        "learnable temperature and a fixed one",
        "distill: {temperature: 2, learnable_temperature: {initial: 4}}\n",
        "distill.temperature",
    ),
    (
        "learnable temperature outside its range",
        "distill: {learnable_temperature: {initial: 30}}\n",
        "distill.learnable_temperature.initial",
    ),
    (
        "a causal-LM model with task classification",
        "student: {name: hf_causal_lm, args: {model_type: gpt2}}\n",
        "student.name",
    ),
    (
        "a classifier with task causal_lm",
        "task: causal_lm\ndata: {name: stdlib_bytes}\nstudent: {hidden: [8]}\n",
        "student.name",
    ),
    (
        "teacher and student vocabularies that are not a padding of one another (256 vs 300)",
        "task: causal_lm\ndata: {name: stdlib_bytes}\n"
        "teacher: {name: hf_causal_lm, args: {model_type: gpt2, vocab_size: 300}}\n"
        "student: {name: hf_causal_lm, args: {model_type: gpt2, vocab_size: 256}}\n",
        "student.args.vocab_size",
    ),
    (
        "a key given twice (`distill:` twice)",
        "distill: {temperature: 2}\ndistill: {alpha: 0.5}\n",
        "distill: given twice",
    ),
    ("YAML that is a list", "- student\n- teacher\n", "top level"),
    ("YAML that is a number", "42\n", "top level"),
    ("YAML that is a string", "just some text\n", "top level"),
    ("invalid YAML (unclosed bracket)", "student: {hidden: [16}\n", "not valid YAML"),
    ("invalid YAML (tab indentation)", "student:\n\thidden: [16]\n", "not valid YAML"),
    (
        "a YAML tag that would run code (`!!python/object/apply`)",
        "student: !!python/object/apply:io.open [PWNED, w]\n",
        "python/object/apply",
    ),
    ("a binary file", b"\x80\x04\x95\x00\x00\xff\xfe", "not UTF-8"),
    ("nesting 1000 levels deep", NESTED, "nested too deeply"),
    ("an alias bomb (10^7 values from 7 aliases)", ALIAS_BOMB, "aliases"),
    ("an alias that contains itself", "student: &s\n  args: {again: *s}\n", "contains itself"),
]


def _load(text: str | bytes):
    return lambda folder: load_config(write("config.yaml", text))


def _distill(text: str | bytes, *overrides: str):
    return lambda folder: dk("distill", write("config.yaml", text), *overrides)


def _validate(text: str | bytes):
    return lambda folder: dk("validate", write("config.yaml", text))


def _load_with(overrides: list[str]):
    return lambda folder: load_config(write("config.yaml", GOOD), overrides)


OVERRIDES = [
    ("an override without `=`", ["train.max_steps"], "train.max_steps"),
    ("an override past the end of a list", ["student.hidden.5=3"], "student.hidden.5"),
    ("an override into a number", ["train.max_steps.x=1"], "train.max_steps"),
    ("an override of the wrong type", ["train.max_steps=ten"], "train.max_steps"),
]

CONFIG_CASES: list[Case] = []
for what, text, names in YAML_CASES:
    trust = "!!python" in str(text)
    CONFIG_CASES.append(Case("config", what, "load_config", _load(text), names, trust))
    CONFIG_CASES.append(Case("CLI", what, "dk distill", _distill(text), names, trust))
for what, overrides, names in OVERRIDES:
    CONFIG_CASES.append(Case("config", what, "load_config", _load_with(overrides), names))
    CONFIG_CASES.append(Case("CLI", what, "dk distill", _distill(GOOD, *overrides), names))

CONFIG_CASES += [
    Case("config", "a config file that does not exist", "load_config",
         lambda folder: load_config("missing.yaml"), "missing.yaml"),
    Case("CLI", "a config file that does not exist", "dk distill",
         lambda folder: dk("distill", "missing.yaml"), "missing.yaml"),
    Case("CLI", "an empty config file", "dk distill",
         lambda folder: dk("distill", write("config.yaml", "")), "student"),
    Case("CLI", "an empty config file", "dk validate",
         lambda folder: dk("validate", write("config.yaml", "")), "empty"),
    Case("CLI", "no `teacher` section", "dk distill",
         lambda folder: dk("distill", write("config.yaml", "student: {hidden: [8]}\n")), "teacher"),
    Case("CLI", "`--resume` without `train.output_dir`", "dk distill --resume",
         lambda folder: dk("distill", write("config.yaml", GOOD), "--resume"), "output_dir"),
    Case("CLI", "a `package.module:callable` that does not import", "dk distill",
         _distill("student: {name: 'no_such_module:make'}\nteacher: {hidden: [16]}\n"), "no_such_module"),
    Case("CLI", "a `package.module:callable` that does not import", "dk validate",
         _validate("student: {name: 'no_such_module:make'}\nteacher: {hidden: [16]}\n"), "student.name"),
    Case("CLI", "`teacher.checkpoint` that does not exist", "dk distill",
         _distill("student: {hidden: [8]}\nteacher: {hidden: [16], checkpoint: nope.safetensors}\n"),
         "teacher.checkpoint"),
    Case("CLI", "`teacher.checkpoint` that does not exist", "dk validate",
         _validate("student: {hidden: [8]}\nteacher: {hidden: [16], checkpoint: nope.safetensors}\n"),
         "teacher.checkpoint"),
    Case("CLI", "several problems at once", "dk validate",
         _validate("distill: {temprature: 2, alpha: 3}\ntrain: {max_steps: 0}\n"), "distill.alpha"),
]  # fmt: skip
