"""YAML documents that remember where each field came from, so errors can name file, line and field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml


class ConfigError(ValueError):
    """A user's YAML is wrong. The message says where (file:line) and which field."""

    def __init__(self, file: str, line: int, field: str, message: str):
        self.file, self.line, self.field, self.message = file, line, field, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


@dataclass
class Document:
    file: str
    data: Any
    node: yaml.Node | None

    def line_of(self, path: tuple[str | int, ...]) -> int:
        """1-based line of the deepest node along `path` that exists."""
        node = self.node
        line = node.start_mark.line + 1 if node is not None else 0
        for key in path:
            if isinstance(node, yaml.MappingNode):
                nxt = None
                for k, v in node.value:
                    if k.value == key:
                        nxt, line = v, k.start_mark.line + 1
                        break
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
            if node is None:
                break
        return line

    def error(self, path: tuple[str | int, ...], message: str) -> ConfigError:
        return ConfigError(self.file, self.line_of(path), ".".join(str(p) for p in path), message)


def load_documents(path: Path | str, text: str | None = None) -> list[Document]:
    """Every non-empty document in a YAML file (or `text`, labelled with `path`)."""
    name = str(path)
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(name, 0, "", f"cannot read: {e.strerror}") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(name, line, "", f"not valid YAML: {getattr(e, 'problem', e)}") from None
    for node in nodes:
        _refuse_duplicate_keys(name, node)
    return [Document(name, d, n) for d, n in zip(datas, nodes) if d is not None]


def _refuse_duplicate_keys(file: str, root: yaml.Node) -> None:
    """PyYAML keeps the last of two equal keys; kubectl refuses the file ("mapping key already
    defined"), and so do we: `name: a` then `name: b` registered b without a word."""
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    seen_nodes: set[int] = set()  # an alias is the same node again: walk it once
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if key is not None and k.tag != "tag:yaml.org,2002:merge":
                    if key in first:
                        raise ConfigError(file, k.start_mark.line + 1, ".".join(str(p) for p in (*path, key)),
                                          f"mapping key '{key}' is already defined at line {first[key]}; give each key once")
                    first[key] = k.start_mark.line + 1
                stack.append((v, (*path, key if key is not None else "?")))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*path, i)) for i, v in enumerate(node.value))


def iter_yaml_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.suffix in (".yaml", ".yml") and p.is_file():
                yield p
    else:
        yield path
