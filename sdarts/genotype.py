"""Genotypes: the one interchange type between search, retrain, export and scoring.

Two kinds, matching the two spaces:
- `NB201Genotype`: one op per edge `i<-j` of the 4-node cell, as NB201's arch string
  `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`.
- `DartsGenotype`: per cell type, 2 (op, input) pairs for each of the 4 intermediate nodes, plus the
  concatenated nodes; written as JSON or the literature's `Genotype(normal=[...], ...)` string, which
  is parsed with `ast` and never evaluated (the reference repos `eval` it).
"""
from __future__ import annotations

import ast
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from sdarts.errors import GenotypeError
from sdarts.spaces.candidates import DARTS_OPS, NB201_OPS
from sdarts.zoo import STRINGS as _LITERATURE_TEXT

if TYPE_CHECKING:  # derivation takes tensors, but parsing and lookups must not import torch
    import torch


# NB201 edges in the benchmark's order: node i takes inputs j < i.
NB201_EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
# Ties in the argmax are broken by this preference (never by list order, which would pick `none`).
NB201_TIE_ORDER: tuple[str, ...] = ("nor_conv_3x3", "nor_conv_1x1", "skip_connect", "avg_pool_3x3", "none")
DARTS_TIE_ORDER: tuple[str, ...] = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
                                    "skip_connect", "max_pool_3x3", "avg_pool_3x3", "none")
DARTS_STEPS = 4


def darts_edges(steps: int = DARTS_STEPS) -> list[tuple[int, int]]:
    """DARTS edges (node, input) in alpha-row order: node 2 takes 0,1; node 3 takes 0,1,2; ..."""
    return [(i + 2, j) for i in range(steps) for j in range(i + 2)]


@dataclass(frozen=True)
class NB201Genotype:
    ops: tuple[str, ...]  # one per edge in NB201_EDGES order
    space: str = field(default="nb201", init=False)

    def __post_init__(self):
        if len(self.ops) != len(NB201_EDGES):
            raise GenotypeError(f"NB201 genotype needs {len(NB201_EDGES)} edges, got {len(self.ops)}")
        for op in self.ops:
            if op not in NB201_OPS:
                raise GenotypeError(f"unknown NB201 op {_short(op)}; expected one of {', '.join(NB201_OPS)}")

    def to_arch_str(self) -> str:
        nodes, k = [], 0
        for i in range(1, 4):
            nodes.append("|" + "|".join(f"{self.ops[k + j]}~{j}" for j in range(i)) + "|")
            k += i
        return "+".join(nodes)

    @classmethod
    def from_arch_str(cls, s: str) -> "NB201Genotype":
        s = s.strip()
        nodes = s.split("+")
        if len(nodes) != 3:
            raise GenotypeError(f"NB201 arch string needs 3 nodes separated by '+', got {len(nodes)}: {_short(s)}")
        ops = []
        for i, node in enumerate(nodes, start=1):
            parts = [p for p in node.strip().strip("|").split("|") if p]
            if len(parts) != i:
                raise GenotypeError(f"NB201 node {i} needs {i} inputs, got {len(parts)} in {_short(node)}")
            for j, part in enumerate(parts):
                op, _, src = part.partition("~")
                if src != str(j):
                    raise GenotypeError(f"NB201 node {i}: expected input ~{j}, got {_short(part)}")
                ops.append(op)
        return cls(tuple(ops))

    def to_json(self) -> dict:
        return {"space": "nb201", "arch": self.to_arch_str()}

    def __str__(self) -> str:  # the arch string (what logs and reports print); repr stays the dataclass's
        return self.to_arch_str()


Pair = tuple[str, int]


@dataclass(frozen=True)
class DartsGenotype:
    normal: tuple[Pair, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Pair, ...]
    reduce_concat: tuple[int, ...]
    space: str = field(default="darts", init=False)

    def __post_init__(self):
        for cell in ("normal", "reduce"):
            pairs = getattr(self, cell)
            if len(pairs) != 2 * DARTS_STEPS:
                raise GenotypeError(f"DARTS genotype {cell}: needs {2 * DARTS_STEPS} (op, input) pairs, "
                                    f"got {len(pairs)}")
            for k, (op, src) in enumerate(pairs):
                if op not in DARTS_OPS:
                    raise GenotypeError(f"DARTS genotype {cell}[{k}]: unknown op {_short(op)}; expected one of "
                                        f"{', '.join(DARTS_OPS)}")
                node = k // 2 + 2
                if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < node:
                    raise GenotypeError(f"DARTS genotype {cell}[{k}]: input {_short(src)} is not an earlier node "
                                        f"of node {node} (0..{node - 1})")
            concat = getattr(self, f"{cell}_concat")
            if not concat or any(not isinstance(c, int) or not 0 <= c < 2 + DARTS_STEPS for c in concat):
                raise GenotypeError(f"DARTS genotype {cell}_concat: bad node list {_short(list(concat))}")

    def to_json(self) -> dict:
        return {"space": "darts",
                "normal": [[op, j] for op, j in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [[op, j] for op, j in self.reduce], "reduce_concat": list(self.reduce_concat)}

    def to_string(self) -> str:
        """The literature's `Genotype(...)` form, with `range(2, 6)` for the usual concat."""
        def concat(c):
            return "range(2, 6)" if tuple(c) == (2, 3, 4, 5) else repr(list(c))
        return (f"Genotype(normal={[tuple(p) for p in self.normal]!r}, normal_concat={concat(self.normal_concat)}, "
                f"reduce={[tuple(p) for p in self.reduce]!r}, reduce_concat={concat(self.reduce_concat)})")

    def __str__(self) -> str:  # the literature's string (what logs and reports print); repr stays the dataclass's
        return self.to_string()


Genotype = Union[NB201Genotype, DartsGenotype]


def _short(value) -> str:
    """repr of a value for an error line, cut to 60 characters (a file can hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pairs(value, where: str) -> tuple[Pair, ...]:
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"{where}: expected a list of (op, input) pairs, got {type(value).__name__}")
    out = []
    for k, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not isinstance(p[0], str):
            raise GenotypeError(f"{where}[{k}]: expected [op, input], got {_short(p)}")
        out.append((p[0], p[1]))
    return tuple(out)


def _concat(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or any(type(c) is not int for c in value):
        raise GenotypeError(f"{where}: expected a list of node numbers, got {_short(value)}")
    return tuple(value)


def from_json(obj: dict) -> Genotype:
    """Genotype from its JSON object (`to_json`: `space` plus the fields of that space's genotype)."""
    if not isinstance(obj, dict):
        raise GenotypeError(f"genotype JSON must be an object with a 'space' key, got {_json_kind(obj)}")
    space = obj.get("space")
    if space == "nb201":
        extra = set(obj) - {"space", "arch"}
        if extra or "arch" not in obj:
            raise GenotypeError(f"NB201 genotype JSON takes keys space, arch; got {sorted(obj)}")
        if not isinstance(obj["arch"], str):
            raise GenotypeError(f"NB201 genotype JSON: 'arch' must be an arch string, got {_short(obj['arch'])}")
        return NB201Genotype.from_arch_str(obj["arch"])
    if space == "darts":
        keys = {"space", "normal", "normal_concat", "reduce", "reduce_concat"}
        if set(obj) - keys:
            raise GenotypeError(f"DARTS genotype JSON: unknown key {sorted(set(obj) - keys)[0]!r}")
        missing = keys - set(obj)
        if missing:
            raise GenotypeError(f"DARTS genotype JSON: missing key {sorted(missing)[0]!r}")
        return DartsGenotype(_pairs(obj["normal"], "normal"), _concat(obj["normal_concat"], "normal_concat"),
                             _pairs(obj["reduce"], "reduce"), _concat(obj["reduce_concat"], "reduce_concat"))
    raise GenotypeError(f"genotype JSON: 'space' must be 'nb201' or 'darts', got {_short(space)}")


def _json_kind(obj) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(obj), type(obj).__name__)


def _literal(node: ast.AST, where: str):
    """A literal list/tuple/number/string, or `range(a, b)` of int constants; anything else is refused."""
    if isinstance(node, ast.Call):
        if (isinstance(node.func, ast.Name) and node.func.id == "range" and not node.keywords
                and 1 <= len(node.args) <= 2 and all(isinstance(a, ast.Constant) and type(a.value) is int
                                                     for a in node.args)):
            return list(range(*[a.value for a in node.args]))
        raise GenotypeError(f"genotype string: {where} contains a call other than range(a, b); refused")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise GenotypeError(f"genotype string: {where} is not a literal; refused") from None


def parse_darts_string(text: str) -> DartsGenotype:
    """Parses `Genotype(normal=[...], normal_concat=range(2, 6), reduce=[...], reduce_concat=...)`."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise GenotypeError(f"genotype string does not parse: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError):  # NUL bytes; nesting beyond the parser's stack
        raise GenotypeError("genotype string does not parse (NUL bytes or nested too deeply)") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, (ast.Name, ast.Attribute))
            and (getattr(call.func, "id", None) or getattr(call.func, "attr", None)) == "Genotype"
            and not call.args):
        raise GenotypeError("genotype string must be Genotype(normal=..., normal_concat=..., reduce=..., "
                            "reduce_concat=...) with keyword arguments only")
    kw = {}
    for k in call.keywords:
        if k.arg not in ("normal", "normal_concat", "reduce", "reduce_concat"):
            raise GenotypeError(f"genotype string: unknown field {_short(k.arg)}")
        kw[k.arg] = _literal(k.value, k.arg)
    return from_json({"space": "darts", **kw})


def parse(text: str) -> Genotype:
    """Any accepted genotype text: JSON object, NB201 arch string, or DARTS `Genotype(...)` string."""
    t = text.strip()
    if not t:
        raise GenotypeError("empty: no genotype text")
    if t[0] in "{[\"-0123456789" or t in ("true", "false", "null"):  # JSON; only an object is a genotype
        try:
            obj = json.loads(t)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype JSON does not parse: {e.msg} at line {e.lineno}") from None
        except RecursionError:
            raise GenotypeError("genotype JSON does not parse: nested too deeply") from None
        except ValueError as e:  # a number past int's digit limit
            raise GenotypeError(f"genotype JSON does not parse: {str(e).split(':')[0][:80]}") from None
        return from_json(obj)
    if t.startswith("|"):
        return NB201Genotype.from_arch_str(t)
    return parse_darts_string(t)


#: the literature genotypes by name (their published text is in `sdarts.zoo`)
LITERATURE: dict[str, Genotype] = {name: parse(text) for name, text in _LITERATURE_TEXT.items()}


#: the most a genotype file may hold; a genotype is under 1 KB, so anything bigger is the wrong file
MAX_FILE_BYTES = 1 << 20


def _read_text(path: str | Path) -> str:
    """The text of a genotype file, read at most MAX_FILE_BYTES; each way it can fail is one
    GenotypeError naming the file (no FIFO or device is opened: those could block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GenotypeError(f"genotype file not found: {path} (nor a literature name: "
                            f"{', '.join(LITERATURE)})") from None
    except OSError as e:
        raise GenotypeError(f"{path}: cannot read the genotype file ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise GenotypeError(f"{path}: is a directory, not a genotype file")
    if not stat.S_ISREG(st.st_mode):
        raise GenotypeError(f"{path}: not a regular file (a genotype file is a JSON or text file)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise GenotypeError(f"{path}: cannot read the genotype file ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise GenotypeError(f"{path}: larger than {MAX_FILE_BYTES} bytes (1 MiB), not a genotype file; "
                            f"refused unread")
    if not data.strip():
        raise GenotypeError(f"{path}: empty file, no genotype in it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenotypeError(f"{path}: binary, not a genotype file (byte 0x{data[e.start]:02x} at offset "
                            f"{e.start} is not UTF-8 text)") from None
    if "\x00" in text:
        raise GenotypeError(f"{path}: binary, not a genotype file (NUL byte at offset {text.index(chr(0))})")
    return text


def load(path: str | Path) -> Genotype:
    """Genotype from a file (any accepted text) or from a literature name (`LITERATURE`, `sdarts.zoo`).

    A bad file (missing, a directory, unreadable, binary, empty, over 1 MiB, or text that is not a
    genotype) raises one GenotypeError line that names the file and what is wrong with it."""
    if str(path) in LITERATURE and not os.path.lexists(path):
        return LITERATURE[str(path)]
    text = _read_text(path)
    try:
        return parse(text)
    except GenotypeError as e:
        raise GenotypeError(f"{path}: {e}") from None
    except (ValueError, TypeError, RecursionError) as e:  # a parser path not covered above: still one line
        raise GenotypeError(f"{path}: not a genotype ({type(e).__name__})") from None


def save(genotype: Genotype, path: str | Path) -> None:
    """Writes the JSON form atomically (temp file + rename)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(genotype.to_json()) + "\n")
    tmp.replace(p)


def _pick(row: torch.Tensor, names: tuple[str, ...], tie_order: tuple[str, ...],
          exclude: tuple[str, ...] = ()) -> tuple[str, float]:
    """Best op of one edge; ties (exact equality) go to the earliest op in `tie_order`."""
    best, best_v = None, None
    for name in tie_order:
        if name in exclude:
            continue
        v = float(row[names.index(name)])
        if best_v is None or v > best_v:
            best, best_v = name, v
    return best, best_v


def derive_nb201(weights: torch.Tensor, op_names: tuple[str, ...] = NB201_OPS,
                 exclude: tuple[str, ...] = ()) -> NB201Genotype:
    """NB201: argmax per edge over the activated weights [6, ops].

    `exclude` drops ops that are not real candidates: under sigmoid, `none` gets no loss gradient
    (its output is zero), so its weight never leaves the init and carries no evidence; with init 0
    it sits at 0.5 and would win every edge whose learned ops all drifted below 0.5.
    """
    return NB201Genotype(tuple(_pick(weights[e], op_names, NB201_TIE_ORDER, exclude)[0]
                               for e in range(len(NB201_EDGES))))


def _derive_darts_cell(weights: torch.Tensor, op_names: tuple[str, ...]) -> tuple[Pair, ...]:
    edges = darts_edges()
    pairs: list[Pair] = []
    for node in range(2, 2 + DARTS_STEPS):
        cands = []
        for e, (i, j) in enumerate(edges):
            if i == node:
                op, v = _pick(weights[e], op_names, DARTS_TIE_ORDER, exclude=("none",))
                cands.append((v, -j, op, j))  # ties prefer the earlier input
        cands.sort(reverse=True)
        pairs.extend((op, j) for _, _, op, j in sorted(cands[:2], key=lambda c: c[3]))
    return tuple(pairs)


def derive_darts(weights: dict[str, torch.Tensor], op_names: tuple[str, ...] = DARTS_OPS) -> DartsGenotype:
    """DARTS: per node, the top-2 incoming edges by their strongest non-`none` op."""
    concat = tuple(range(2, 2 + DARTS_STEPS))
    return DartsGenotype(_derive_darts_cell(weights["normal"], op_names), concat,
                         _derive_darts_cell(weights["reduce"], op_names), concat)
