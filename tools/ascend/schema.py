"""Static conformance check of every `torch_npu` call in the ascend backend against the pinned wheel.

Ground truth (read from the wheel, see `v4hal.tools.ascend.wheel`): the `npu` operator schemas in the codegen
yaml, the per-op docs in `_op_plugin_docs.py` (parameter paragraphs restrict literal values such
as layouts and modes, and list the chips an op supports) and the dtype enums of the Meta file.

The checker parses `backends/ascend/*.py` with `ast` and looks at every call written as the literal
`npu().npu_<name>(...)` (the convention: `from v4hal.backends.ascend import npu`). Per call site it
checks that the op exists; every keyword exists (with a suggestion for near misses); the number of
positional arguments fits (a positional argument landing on a keyword-only parameter is an error:
torch_npu would raise); required arguments are present; literal arguments have the schema's type
and, where the docs restrict a parameter to a list of values, one of those values; plus the known
traps (`npu_quant_matmul` returns int8 unless `output_dtype` is given). Any other way of reaching
torch_npu (`import torch_npu`, `npu()` kept in a variable, `getattr`) cannot be checked and is
itself a finding.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from v4hal.backends import ascend
from v4hal.tools.ascend import wheel

CHIPS = ("A2", "A3", "A5")
BACKEND_DIR = Path(ascend.__file__).resolve().parent

# Keyword -> why it is wrong, for misspellings that have bitten people before.
KNOWN_MISSPELLINGS = {
    "expert_for_source_row": "the schema spells it export_for_source_row (and it is positional #7 "
                             "of npu_moe_finalize_routing, a Tensor? without default: pass it, even as None)",
}
# op -> (keyword that must be passed, why).
REQUIRED_BY_DOCS = {
    "npu_quant_matmul": ("output_dtype", "npu_quant_matmul returns int8 unless output_dtype is given "
                                         "(docs: 默认值为None, 代表输出Tensor数据类型为int8)"),
}


# ----------------------------------------------------------------------------------------- schemas

@dataclass(frozen=True)
class Param:
    name: str
    type: str          # torch's type string: Tensor, Optional[Tensor], int, List[int], str, ...
    kwarg_only: bool
    has_default: bool
    default: Any

    @property
    def optional(self) -> bool:
        return self.type.startswith("Optional[")

    @property
    def base(self) -> str:
        return self.type[len("Optional["):-1] if self.optional else self.type


@dataclass(frozen=True)
class Schema:
    name: str
    overload: str
    params: tuple[Param, ...]
    returns: tuple[str, ...]
    text: str

    @property
    def positional(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.kwarg_only)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _yaml_funcs(text: str, section: str) -> list[str]:
    """The `func:` schemas of one top-level section of torch_npu's codegen yaml (one per line, so
    no yaml parser is needed)."""
    out, current = [], None
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_]+):\s*$", line)
        if top:
            current = top.group(1)
            continue
        m = re.match(r"^\s*-?\s*func:\s*(.+?)\s*$", line)
        if m and current == section:
            out.append(m.group(1))
    return out


def parse_schema(text: str) -> Schema:
    s = torch._C.parse_schema(text)
    params = tuple(Param(a.name, str(a.type), a.kwarg_only, a.has_default_value(), a.default_value)
                   for a in s.arguments)
    return Schema(s.name, s.overload_name, params, tuple(str(r.type) for r in s.returns), text)


@lru_cache(maxsize=None)
def schema_texts() -> tuple[str, ...]:
    """The `npu` namespace's schemas: the `custom` section of the codegen yaml (the `symint`
    section repeats some of them; `supported` lists aten ops torch_npu implements)."""
    return tuple(_yaml_funcs(wheel.schema_yaml(), "custom"))


@lru_cache(maxsize=None)
def schemas() -> dict[str, tuple[Schema, ...]]:
    """op name -> its overloads."""
    out: dict[str, list[Schema]] = {}
    for text in schema_texts():
        s = parse_schema(text)
        out.setdefault(s.name, []).append(s)
    return {k: tuple(v) for k, v in out.items()}


# -------------------------------------------------------------------------------------------- docs

@lru_cache(maxsize=None)
def docs() -> dict[str, str]:
    """op name -> its doc text (the `_add_torch_npu_docstr(name, text)` calls of the docs file)."""
    out = {}
    with warnings.catch_warnings():  # the docs' strings hold LaTeX: invalid escape sequences
        warnings.simplefilter("ignore")
        tree = ast.parse(wheel.docs_source())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_add_torch_npu_docstr"
                and len(node.args) == 2 and all(isinstance(a, ast.Constant) for a in node.args)):
            out[node.args[0].value] = node.args[1].value
    return out


_SECTION_END = re.compile(r"^\s*(调用示例|示例|支持的PyTorch版本|支持版本|约束说明|输出说明|返回值说明|"
                          r"Examples?)\s*[:：]?\s*$")


def param_docs(op: str) -> dict[str, str]:
    """Parameter name -> its paragraph in the op's docs (docs mark a parameter's paragraph by a
    line starting with its name followed by `:`, `（`, `(`, or bold `**name**`)."""
    text = docs().get(op, "")
    names = [p.name for s in schemas().get(op, ()) for p in s.params]
    if not text or not names:
        return {}
    alt = "|".join(sorted((re.escape(n) for n in set(names)), key=len, reverse=True))
    head = re.compile(rf"^\s*(?:-\s*)?(?:\*\*)?({alt})(?:\*\*)?\s*(?:[:：(（])")
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = head.match(line)
        if m:
            current = m.group(1)
            out.setdefault(current, []).append(line)
        elif current is not None:
            if _SECTION_END.match(line):
                current = None
            else:
                out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


# A clause that enumerates allowed values: 当前仅支持取值rint / 支持传入TND、BSND和PA_BSND /
# 支持输入torch.int8、torch.bfloat16 / 支持0/3 / 支持{"rint", "floor"} / 取值范围为0 / 取值为0和1.
_LIST_PHRASE = re.compile(r"(当前仅支持取值|当前仅支持传入|当前只支持取|当前只支持传入|当前只支持|当前仅支持|仅支持取值|"
                          r"仅支持传入|仅支持|支持传入|当前支持取|当前支持|支持取值为|支持取值|支持输入|取值为|"
                          r"取值范围为(?=\s*-?\d)|支持(?=\s*[{\d-])|支持(?=[A-Z][A-Z0-9_]*[、和/]))(.*)")
# Clauses describing a range or a divisibility rule are constraints, not enumerations.
_NOT_A_LIST = re.compile(r"倍数|不能|大于|小于|超过|不超|\d\s*-\s*\d|\[|维|[<>=≤≥~]")
_TOKEN = re.compile(r"torch_npu\.\w+(?:\(\d+\))?|torch\.\w+|-?\d+(?:\.\d+)?|[A-Za-z_][A-Za-z0-9_]*")
_NAME_EDGE = "A-Za-z0-9_."
# Lines qualified by a product we do not target (Atlas inference cards = 310P, Atlas training =
# 910A) say nothing about A2/A3/A5.
_OTHER_CHIP = re.compile(r"Atlas\s*(推理系列|训练系列|200|300|500)|310")
_OUR_CHIP = re.compile(r"A2|A3|A5|910B|910C|950")


@lru_cache(maxsize=None)
def npu_dtype_codes() -> dict[str, int]:
    """torch_npu's own dtype constants (`torch_npu.hifloat8` = 290, ...) and torch's native
    dtypes, as the integer codes the `int? *_dtype` parameters receive, from the Meta file's maps
    and the docs' `torch_npu.name(code)` mentions."""
    codes: dict[str, int] = {}
    tree = ast.parse(wheel.meta_source())
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
            continue
        target = getattr(node.targets[0], "id", "")
        for k, v in zip(node.value.keys, node.value.values):
            if not isinstance(k, ast.Constant) or not isinstance(k.value, int):
                continue
            if target == "TORCH_NPU_DTYPE_TO_STRING_MAP" and isinstance(v, ast.Constant):
                codes[v.value] = k.value
            elif target == "TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP" and isinstance(v, ast.Attribute) \
                    and k.value < 256:
                codes.setdefault(f"torch.{v.attr}", k.value)
    for name, code in re.findall(r"(torch_npu\.\w+)\((\d+)\)", wheel.docs_source()):
        codes.setdefault(name, int(code))
    return codes


def _literal_of_token(token: str, base: str):
    codes = npu_dtype_codes()
    if token.startswith(("torch.", "torch_npu.")):
        name = token.split("(")[0]
        return codes.get(name, name)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if re.fullmatch(r"-?\d+\.\d+", token):
        return float(token)
    if token in ("True", "False", "true", "false"):
        return token.lower() == "true"
    if token == "None":
        return None
    return token if base == "str" else ...


def allowed_values(op: str, param: str) -> set | None:
    """The literal values the docs allow for `param`, or None when they do not enumerate them.

    Read clause by clause (split at 。，； and line ends) from enumerating phrases (see
    _LIST_PHRASE) and from enumerations `param为N时` (two or more). A clause whose 仅支持 ("only
    supports") is not conditioned by a preceding 时 ("when ...") is strict and wins over the
    others; otherwise the union is taken, so a value allowed only under some condition still
    passes (the Meta dry run checks the combinations). dtype parameters read dtype names
    (torch.int8, torch_npu.float4_e2m1fn_x2(296)) as their integer codes.
    """
    para = param_docs(op).get(param)
    spec = next((p for s in schemas().get(op, ()) for p in s.params if p.name == param), None)
    if not para or spec is None or spec.base not in ("int", "str"):
        return None
    # The head names the parameter and its type; only what follows is description.
    body = re.sub(rf"^\s*(?:-\s*)?(?:\*\*)?{re.escape(param)}(?:\*\*)?\s*[(（][^)）]*[)）]", "", para)
    dtype_like = param.endswith("dtype") or param == "dst_type"
    strict: set = set()
    loose: set = set()
    others = {p.name for s in schemas()[op] for p in s.params} - {param}
    lines = [line for line in body.splitlines() if not _OTHER_CHIP.search(line) or _OUR_CHIP.search(line)]
    for clause in re.split(r"[。，；;]|\. |\n", "\n".join(lines)):
        m = _LIST_PHRASE.search(clause)
        if m is None or re.search(r"(最大|最多|最小|至少)$", clause[:m.start()]):
            continue
        phrase = re.split(r"（|\((?!\d)", m.group(2))[0]  # a parenthesis starts prose, not values
        if _NOT_A_LIST.search(phrase) or re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*为", phrase):
            continue  # a range, or 仅支持split_item为0或1 / 仅支持Q_S为1~16: a rule about something else
        tokens = _TOKEN.findall(phrase)
        if tokens and tokens[0] in others:
            continue
        if dtype_like and any(t.startswith("torch") for t in tokens):
            tokens = [t for t in tokens if t.startswith("torch")]  # the codes in prose are not dtypes
        values = {v for v in (_literal_of_token(t, spec.base) for t in tokens) if v is not ... and v is not None}
        conditional = "时" in clause[:m.start()]
        only = "仅" in m.group(1) or "只" in m.group(1)
        (strict if only and not conditional else loose).update(values)
    enumerated = re.findall(rf"(?<![{_NAME_EDGE}]){re.escape(param)}(?![{_NAME_EDGE}])\s*为\s*"
                            rf"(-?\d+|[A-Z][A-Z0-9_]*)\s*时", body)
    if len(set(enumerated)) >= 2:
        loose |= {_literal_of_token(t, spec.base) for t in enumerated}
    values = strict or loose
    if spec.base == "int":
        values = {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    else:
        # Layout names are upper-case identifiers; a lower-case mode name counts only where the
        # docs quote it ("rint") or it is the default, so prose words in the clause are dropped.
        quoted = set(re.findall(r"[\"'{“`]\s*([a-z][a-z0-9_]*)\s*[\"'}”`]", para)) | {spec.default}
        values = {v for v in values if isinstance(v, str)
                  and (re.fullmatch(r"[A-Z][A-Z0-9_]*", v) or v in quoted)}
    return values or None


# Names the docs use for tensor dtypes, and what carries them in torch (torch_npu packs int4 in
# int32 and its hifloat8 / float4 types in uint8, as its Meta kernels do).
DOC_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "float8_e8m0fnu": torch.float8_e8m0fnu, "int4": torch.int32, "hifloat8": torch.uint8,
    "float4_e2m1": torch.uint8, "float4_e1m2": torch.uint8, "float4_e2m1fn_x2": torch.uint8,
    "float4_e1m2fn_x2": torch.uint8,
}
_DTYPE_CLAUSE = re.compile(r"(?:数据类型支持|支持的数据类型为|数据类型为|数据类型要求为|数据类型仅支持)\s*([^。；;\n，,]*)")


def tensor_dtypes(op: str, param: str) -> set[torch.dtype] | None:
    """The dtypes the docs allow for a tensor parameter (union over every product line we
    target), or None when its paragraph names none (e.g. "same dtype as x")."""
    spec = next((p for s in schemas().get(op, ()) for p in s.params if p.name == param), None)
    para = param_docs(op).get(param)
    if spec is None or para is None or "Tensor" not in spec.base:
        return None
    found: set[torch.dtype] = set()
    for line in para.splitlines():
        if _OTHER_CHIP.search(line) and not _OUR_CHIP.search(line):
            continue
        for clause in _DTYPE_CLAUSE.findall(line):
            for m in re.finditer(r"[A-Za-z0-9_]+", clause):
                name = m.group(0).lower().removeprefix("torch")
                if name in DOC_DTYPES and not clause[m.end():].lstrip("`").startswith("时"):
                    found.add(DOC_DTYPES[name])
    return found or None


_CHIP_SECTION = re.compile(r"^\s*(支持的型号|支持的芯片型号|支持的产品型号|产品支持情况|支持的NPU产品)\s*[:：]?\s*$")


def doc_chips(op: str) -> set[str] | None:
    """The chips the op's docs list under 支持的型号 (A2 = Atlas A2 / 910B, A3 = Atlas A3 / 910C,
    A5 = Ascend 950 / Atlas A5), or None when the docs have no such section."""
    lines = docs().get(op, "").splitlines()
    start = next((i for i, line in enumerate(lines) if _CHIP_SECTION.match(line)), None)
    if start is None:
        return None
    section = []
    for line in lines[start + 1:]:
        if _SECTION_END.match(line) or (section and not line.strip() and len(section) > 0
                                        and not any(k in line for k in ("Atlas", "950", "A2", "A3"))):
            if section:
                break
            continue
        section.append(line)
    text = " ".join(section)
    chips = set()
    if re.search(r"A2|910B", text):
        chips.add("A2")
    if re.search(r"A3|910C|910_93", text):
        chips.add("A3")
    if re.search(r"950|A5", text):
        chips.add("A5")
    return chips or None


# ------------------------------------------------------------------------------------------ checker

@dataclass
class Finding:
    path: str
    line: int
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.op}: {self.message}"


@dataclass
class CallSite:
    path: str
    line: int
    op: str
    positional: list[ast.expr]
    keywords: dict[str, ast.expr]
    starred: bool = False
    findings: list[Finding] = field(default_factory=list)


_UNKNOWN = object()


def literal(node: ast.expr):
    """The value of a literal argument (constants, -constants, lists/tuples of them, `torch.<dtype>`
    and `npu().<dtype constant>` as dtype codes), or _UNKNOWN for anything computed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = literal(node.operand)
        return -v if isinstance(v, (int, float)) and not isinstance(v, bool) else _UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [literal(e) for e in node.elts]
        return _UNKNOWN if any(i is _UNKNOWN for i in items) else list(items)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "torch" \
                and isinstance(getattr(torch, node.attr, None), torch.dtype):
            return DtypeLiteral(f"torch.{node.attr}")
        if _is_npu_call(node.value):
            return DtypeLiteral(f"torch_npu.{node.attr}")
    return _UNKNOWN


@dataclass(frozen=True)
class DtypeLiteral:
    name: str

    @property
    def code(self) -> int | None:
        return npu_dtype_codes().get(self.name)

    def __str__(self) -> str:
        return self.name


def _is_npu_call(node: ast.expr) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "npu"
            and not node.args and not node.keywords)


def _type_ok(param: Param, value) -> bool:
    if value is None:
        return param.optional or (param.has_default and param.default is None)
    base = param.base
    if isinstance(value, DtypeLiteral):
        return base == "int"  # ScalarType is an int in the schema; torch converts dtypes
    if base in ("int", "SymInt"):
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    if base.startswith("List[int]") or base.startswith("List[SymInt]"):
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if base.startswith("List[float]"):
        return isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
    if base in ("Tensor", "List[Tensor]", "List[Optional[Tensor]]"):
        return False  # a literal where a tensor belongs
    return True


def _value_allowed(op: str, param: Param, value) -> tuple[bool, set | None]:
    allowed = allowed_values(op, param.name)
    if allowed is None or value is None:
        return True, allowed
    v = value.code if isinstance(value, DtypeLiteral) else value
    names = {a for a in allowed if isinstance(a, str)}
    if isinstance(value, DtypeLiteral) and value.name in names:
        return True, allowed
    return v in allowed, allowed


def check_against(schema: Schema, site: CallSite) -> list[str]:
    """Why `site` does not fit `schema` (empty when it does)."""
    errors = []
    positional = schema.positional
    bound: dict[str, ast.expr] = {}
    for i, node in enumerate(site.positional):
        if i < len(positional):
            bound[positional[i].name] = node
        elif i < len(schema.params):
            p = schema.params[i]
            errors.append(f"positional argument #{i + 1} would fill keyword-only parameter '{p.name}': "
                          f"pass it as {p.name}=...")
        else:
            errors.append(f"{len(site.positional)} positional arguments, the schema takes at most "
                          f"{len(positional)}")
            break
    names = [p.name for p in schema.params]
    for kw, node in site.keywords.items():
        if kw not in names:
            hint = KNOWN_MISSPELLINGS.get(kw)
            if hint is None:
                close = difflib.get_close_matches(kw, names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"parameters: {', '.join(names)}"
            errors.append(f"unknown keyword '{kw}' ({hint})")
        elif kw in bound:
            errors.append(f"'{kw}' given both positionally and by keyword")
        else:
            bound[kw] = node
    for p in schema.params:
        if p.name not in bound and not p.has_default and not site.starred:
            errors.append(f"required argument '{p.name}' ({p.type}) is missing")
    for name, node in bound.items():
        p = schema.param(name)
        value = literal(node)
        if p is None or value is _UNKNOWN:
            continue
        if not _type_ok(p, value):
            errors.append(f"'{name}' expects {p.type}, got the literal {value!s}")
            continue
        ok, allowed = _value_allowed(schema.name, p, value)
        if not ok:
            shown = ", ".join(sorted(map(str, allowed)))
            errors.append(f"'{name}'={value!s} is not a value the docs allow ({shown})")
    return errors


def call_sites(path: Path, source: str | None = None) -> list[CallSite]:
    """Every `npu().npu_<name>(...)` call in a file, plus findings for torch_npu reached any other way."""
    source = path.read_text() if source is None else source
    tree = ast.parse(source, filename=str(path))
    sites: list[CallSite] = []
    stray: list[CallSite] = []
    literal_npu_calls = set()
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_npu_call(node.func.value):
            literal_npu_calls.add(id(node.func.value))
            attr = node.func.attr
            site = CallSite(str(path), node.lineno, attr, list(node.args),
                            {k.arg: k.value for k in node.keywords if k.arg is not None},
                            starred=any(isinstance(a, ast.Starred) for a in node.args)
                            or any(k.arg is None for k in node.keywords))
            sites.append(site)
        elif isinstance(node, ast.Attribute) and _is_npu_call(node.value) and id(node) not in called:
            literal_npu_calls.add(id(node.value))
            if node.attr not in {n.split(".", 1)[1] for n in npu_dtype_codes() if n.startswith("torch_npu.")}:
                stray.append(CallSite(str(path), node.lineno, node.attr, [], {}, findings=[Finding(
                    str(path), node.lineno, node.attr,
                    "npu().<attr> used other than as a call; only npu().npu_<name>(...) calls and "
                    "torch_npu dtype constants can be checked")]))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "torch_npu" for m in mods):
                stray.append(CallSite(str(path), node.lineno, "import", [], {}, findings=[Finding(
                    str(path), node.lineno, "import torch_npu",
                    "import torch_npu directly; use `from v4hal.backends.ascend import npu` and call "
                    "npu().npu_<name>(...) so the call can be checked and dry-run")]))
    for node in ast.walk(tree):
        if _is_npu_call(node) and id(node) not in literal_npu_calls:
            stray.append(CallSite(str(path), node.lineno, "npu()", [], {}, findings=[Finding(
                str(path), node.lineno, "npu()", "npu() used other than as npu().npu_<name>(...) "
                "(kept in a variable or passed to getattr): the call cannot be checked")]))
    for site in sites:
        site.findings = check_site(site)
    return sites + stray


def check_site(site: CallSite) -> list[Finding]:
    def finding(msg: str) -> Finding:
        return Finding(site.path, site.line, site.op, msg)

    if not site.op.startswith("npu_") and f"torch_npu.{site.op}" not in npu_dtype_codes():
        return [finding("not an npu_* op; call torch_npu ops only as npu().npu_<name>(...)")]
    overloads = schemas().get(site.op)
    if not overloads:
        close = difflib.get_close_matches(site.op, list(schemas()), n=3)
        return [finding(f"no such op in torch-npu {wheel.TORCH_NPU_VERSION}"
                        + (f" (close: {', '.join(close)})" if close else ""))]
    out = []
    if site.starred:
        out.append(finding("*args/**kwargs in the call: spell the arguments out so they can be checked"))
    results = [(check_against(s, site), s) for s in overloads]
    errors, best = min(results, key=lambda r: len(r[0]))
    if errors:
        where = f" (overload {best.name}.{best.overload})" if len(overloads) > 1 and best.overload else ""
        out += [finding(e + where) for e in errors]
    need = REQUIRED_BY_DOCS.get(site.op)
    if need is not None and need[0] not in site.keywords:
        out.append(finding(need[1]))
    return out


def backend_files(directory: Path = BACKEND_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if p.name != "__init__.py")


def check(paths: list[Path] | None = None) -> tuple[list[CallSite], list[Finding]]:
    """All call sites in the ascend backend modules (or `paths`) and every finding."""
    sites = [s for p in (paths if paths is not None else backend_files()) for s in call_sites(p)]
    return sites, [f for s in sites for f in s.findings]
