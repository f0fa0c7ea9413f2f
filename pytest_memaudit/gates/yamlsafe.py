"""YAML for audit files, safe against hostile or mistaken input.

``yaml.safe_load`` builds no arbitrary objects, but it still accepts what an audit file never
needs and a hostile one can abuse: aliases that expand to billions of nodes (a few hundred bytes
that hang whoever walks or prints the value), nesting thousands of levels deep (a
``RecursionError`` in the composer), numbers hundreds of digits long (``OverflowError`` when
made a float) and duplicate keys (silently keeping the last value). ``load`` refuses each with
a ``yaml.MarkedYAMLError`` that says where and why.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.error import MarkedYAMLError
from yaml.nodes import MappingNode, Node, SequenceNode

from ..errors import quote

MAX_BYTES = 1 << 20  # an audit file is a few kB
MAX_DEPTH = 64  # levels of nesting, aliases expanded
MAX_NODES = 100_000  # nodes of the document, aliases expanded
MAX_NUMBER_CHARS = 32  # a threshold needs a handful of digits

_MERGE_TAG = "tag:yaml.org,2002:merge"


def load(text: str) -> Any:
    """The one YAML document in ``text``, with the limits above; ``yaml.YAMLError`` otherwise."""
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > MAX_BYTES:
        raise yaml.YAMLError(f"the file is {size:,} bytes; an audit file may have at most {MAX_BYTES:,}")
    return yaml.load(text, Loader=AuditFileLoader)  # noqa: S506 (a SafeLoader subclass)


class AuditFileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with limits on depth, expanded size and numbers, and no duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise MarkedYAMLError(
                    problem=f"nested more than {MAX_DEPTH} levels deep; an audit file needs a few",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expanded(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            _check_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)

    def construct_bounded_number(self, node):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise ConstructorError(
                None, None,
                f"the number {quote(node.value, 40)} is {len(node.value)} characters long; "
                f"write it with at most {MAX_NUMBER_CHARS}",
                node.start_mark,
            )
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)


AuditFileLoader.add_constructor("tag:yaml.org,2002:int", AuditFileLoader.construct_bounded_number)
AuditFileLoader.add_constructor("tag:yaml.org,2002:float", AuditFileLoader.construct_bounded_number)


def _check_duplicate_keys(loader: yaml.SafeLoader, node: MappingNode) -> None:
    """A key written twice in one mapping (merged ``<<`` keys may be overridden, as YAML intends)."""
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            earlier = first_line.get(key)
        except TypeError:  # unhashable: the constructor reports it
            continue
        line = key_node.start_mark.line + 1
        if earlier is not None:
            raise ConstructorError(
                None, None,
                f"duplicate key {quote(key)} (lines {earlier} and {line}): YAML would silently keep only the "
                "last value; remove one of them",
                key_node.start_mark,
            )
        first_line[key] = line


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded(root: Node) -> None:
    """Refuse a document whose aliases expand past ``MAX_NODES`` nodes or ``MAX_DEPTH`` levels,
    or refer to themselves; counted on the composed graph, each node once, without recursion."""
    expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), aliases expanded
    open_nodes: set[int] = set()  # started and not finished: the current path from the root
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_nodes.discard(key)
            nodes = 1 + sum(expanded[id(child)][0] for child in children)
            depth = 1 + max((expanded[id(child)][1] for child in children), default=0)
            if nodes > MAX_NODES or depth > MAX_DEPTH:
                what = f"more than {MAX_NODES:,} values" if nodes > MAX_NODES else f"more than {MAX_DEPTH} levels"
                raise MarkedYAMLError(
                    problem=f"with its aliases (*name) expanded, this value holds {what}; "
                    "an audit file needs far fewer: write the values out instead of nesting aliases",
                    problem_mark=node.start_mark,
                )
            expanded[key] = (nodes, depth)
        elif key in open_nodes:
            raise MarkedYAMLError(problem="this alias refers to a value that contains it (a cycle)",
                                  problem_mark=node.start_mark)
        elif key not in expanded:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in expanded)
