"""The one YAML reader for files a user hands the tool: rates files, recipes, a run's resolved_config.yaml.

Every read is bounded before anything is built from it:

- the file's size (``max_bytes``, 256 KiB by default) is checked before it is read;
- nesting is at most ``MAX_DEPTH`` levels (flow ``[``/``{`` counted before parsing, block
  nesting on the composed nodes);
- anchors and aliases may expand to at most ``MAX_NODES`` nodes (a "billion laughs" file of a
  few lines is refused after composing, before anything walks it), and a recursive alias is refused;
- a key may appear once in a mapping (a duplicate is refused with its line, never silently replaced);
- only plain YAML types are built (``SafeLoader``: no Python objects).

Every failure is one ``UserError`` naming the file (and the line where the parser knows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compressor.errors import UserError

MAX_BYTES = 256 << 10  # rates files, recipes and resolved configs are a few KiB
MAX_DEPTH = 64
MAX_NODES = 100_000  # with every alias expanded
ECHO_CHARS = 60


class Refused(Exception):
    """A document the bounded loader will not build (reason in ``str``)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def _line(node: yaml.Node) -> str:
    return f" (line {node.start_mark.line + 1})" if getattr(node, "start_mark", None) is not None else ""


class _BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """``SafeLoader`` that refuses duplicate keys, deep nesting and aliases that expand beyond a bound.

    PyYAML shares one node per anchor, so composing is cheap; what explodes is anything that walks
    the result (validation, ``repr`` in an error, saving). The expanded size and depth are counted
    on the node graph before anything is constructed, memoized per node: linear in the file.
    """

    max_nodes = MAX_NODES
    max_depth = MAX_DEPTH

    def get_single_data(self) -> Any:  # what ``yaml.load`` calls
        node = self.get_single_node()
        if node is None:
            return None
        expanded_size(node, self.max_nodes)
        check_depth(node, self.max_depth)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeConstructor reports it
                continue
            if dup:
                raise Refused(f"duplicate key {_short(key)}{_line(key_node)}; each key may appear once")
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_NODES) -> int:
    """Node count with every alias expanded; raises ``Refused`` past ``limit`` nodes or on a
    recursive alias. Iterative and memoized per node: linear in the file, whatever its depth."""
    memo: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            total = 1 + sum(memo[id(k)] for k in _children(node))
            if total > limit:
                raise Refused(f"expands to more than {limit:,} YAML nodes{_line(node)} (aliases of aliases?); "
                              "refused")
            memo[nid] = total
            continue
        if nid in memo:
            continue
        if nid in active:
            raise Refused(f"has a recursive alias (an anchor used inside itself){_line(node)}; refused")
        active.add(nid)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in memo)
    return memo[id(root)]


def check_depth(root: yaml.Node, max_depth: int = MAX_DEPTH) -> None:
    """Refuse the first node (in file order) more than ``max_depth`` levels down. Walks the
    expanded document, so call it after ``expanded_size`` has bounded that."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise Refused(f"is nested more than {max_depth} levels deep{_line(node)}; refused")
        stack.extend((k, depth + 1) for k in reversed(_children(node)))


def flow_too_deep(text: str, max_depth: int = MAX_DEPTH) -> int | None:
    """The line where ``[``/``{`` nesting (quoting ignored: an upper bound of the flow depth) first
    passes ``max_depth``, or None."""
    depth, line = 0, 1
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > max_depth:
                return line
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "\n":
            line += 1
    return None


def parse_yaml(text: str, *, source: str, max_bytes: int = MAX_BYTES, kind: str = "YAML file") -> Any:
    """Parse YAML text with the bounds above; every failure is one ``UserError`` naming ``source``."""
    if len(text) > max_bytes:
        raise UserError(f"is larger than {max_bytes // 1024} KiB; a {kind} is a few lines", source=source)
    deep_at = flow_too_deep(text)
    if deep_at is not None:  # the composer recurses per level: refuse before it starts
        raise UserError(f"is nested more than {MAX_DEPTH} levels deep (line {deep_at}); refused", source=source)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except Refused as exc:
        raise UserError(str(exc), source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        if "maximum nesting depth" in str(getattr(exc, "problem", "")):
            raise UserError(f"is nested more than {MAX_DEPTH} levels deep{where}; refused", source=source) from None
        raise UserError(f"not valid YAML{where}", source=source) from None
    except RecursionError:  # the pure-Python composer, where libyaml is missing
        raise UserError(f"is nested more than {MAX_DEPTH} levels deep; refused", source=source) from None


def load_yaml(path: str | Path, *, max_bytes: int = MAX_BYTES, kind: str = "YAML file") -> Any:
    """Read and parse a small, untrusted YAML file: its size is checked before it is read."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{kind} not found", source=src)
    try:
        if p.stat().st_size > max_bytes:
            raise UserError(f"is larger than {max_bytes // 1024} KiB; a {kind} is a few lines", source=src)
        with open(p, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"cannot read ({exc.strerror or type(exc).__name__})", source=src) from exc
    if len(raw) > max_bytes:
        raise UserError(f"is larger than {max_bytes // 1024} KiB; a {kind} is a few lines", source=src)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError("not a text file", source=src) from exc
    return parse_yaml(text, source=src, max_bytes=max_bytes, kind=kind)
