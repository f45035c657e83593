"""What ``yaml.safe_load`` accepts silently but a config must not hold, found on the composed
node tree (``yaml.compose``: nodes only, no Python objects built, no tags run):

- a mapping key given twice: PyYAML keeps the last value and drops the first without a word,
  so ``distill:`` written twice would lose the first section's fields;
- aliases that expand to a huge document (the "billion laughs": ten aliases of ten aliases of
  ...), which every later deep copy of the config would materialise.

>>> document_problems("distill: {alpha: 0.5}\\ndistill: {temperature: 2}\\n")
['distill: given twice (lines 1 and 2); YAML would keep only the last, silently']
"""

from __future__ import annotations

import math

import yaml

MAX_VALUES = 100_000  # values of the document with every alias expanded


def document_problems(text: str) -> list[str]:
    """Repeated keys and alias bombs in the YAML ``text`` (which must parse)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return []
    problems: list[str] = []
    _repeated_keys(root, "", problems, set())
    size = _expanded_size(root, {})
    if size == math.inf:
        problems.append("the document contains itself through a YAML alias (&name / *name)")
    elif size > MAX_VALUES:
        problems.append(
            f"the document expands to {size:,.0f} values through YAML aliases (&name / *name), "
            f"more than a config needs ({MAX_VALUES:,}); write the values out"
        )
    return problems


def _repeated_keys(node: yaml.Node, path: str, problems: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: its keys were checked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key in lines:
                problems.append(
                    f"{where}: given twice (lines {lines[key]} and {line}); YAML would keep only "
                    "the last, silently"
                )
            elif key is not None:
                lines[key] = line
            _repeated_keys(value_node, where, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _repeated_keys(item, f"{path}.{index}", problems, seen)


def _expanded_size(node: yaml.Node, sizes: dict[int, float]) -> float:
    """1 + the sizes of the children, each alias counted in full (memoised: linear time);
    infinite for a node that contains itself."""
    if id(node) not in sizes:
        sizes[id(node)] = math.inf  # until its children are counted: a cycle stays infinite
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]
