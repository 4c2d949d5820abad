"""Generate the endpoint reference in docs/protocol.md from the table of endpoints and the orchestrator's app.

    python scripts/protocol_doc.py            # rewrite the generated part of docs/protocol.md
    python scripts/protocol_doc.py --check    # exit 1, printing a diff, when docs/protocol.md is stale

The app is built the way the orchestrator builds it (`build_orchestrator`, an embedded S3 server and a local
chain in a temporary folder), and only its OpenAPI schema and routes are read: the lifespan never runs.
Each route is looked up in the table (`common.protocol.endpoints`), and every entry of the table must be
served. What the schema does not say comes from beside it:

- the request body and who may call: the table (signed routes read their body themselves, to verify the
  signature over the raw bytes, so FastAPI does not see it as a body);
- the error codes: every `RequestRejected(status, "code", ...)` and `HTTPException` reachable from the
  endpoint and its dependencies (the signed body's parsing; the signature checks are listed once, for all
  signed routes), found by following their calls, by name, through the orchestrator package. Following by
  name can only over-approximate: a listed code is raised somewhere on a path the endpoint may take.

Only the part between the markers is rewritten; the hand-written introduction above it is kept.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"

# FastAPI's own validation models never reach a client: the app answers every error with ErrorBody.
_FASTAPI_MODELS = {"HTTPValidationError", "ValidationError"}
_TAG_ORDER = ["public", "miners", "work", "merge", "validators"]


# ---------------------------------------------------------------------------------------------------------
# Building the app


def build_app() -> Any:
    """The orchestrator's FastAPI app, built from settings in a temporary folder (nothing else touched).

    The schema must not depend on whoever runs this, so the caller's IOTA_* variables and .env are ignored.
    """
    for name in [n for n in os.environ if n.startswith("IOTA_")]:
        del os.environ[name]
    import torch

    torch.set_num_threads(1)
    from common.config import AuthSettings, ChainSettings, DataSettings, ModelSettings
    from common.s3server import EmbeddedS3
    from orchestrator.app import create_app
    from orchestrator.server import build_orchestrator
    from orchestrator.settings import OrchestratorSettings

    home = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="iota-openapi-") as tmp, EmbeddedS3(port=0) as s3:
        folder = Path(tmp)
        os.chdir(folder)  # where no .env is
        try:
            corpus = folder / "corpus"
            corpus.mkdir()
            (corpus / "a.txt").write_text("the schema does not depend on the data\n" * 64)
            orchestrator = build_orchestrator(
                OrchestratorSettings(state_path=folder / "state.sqlite"),
                s3=s3.settings(bucket="openapi"),
                chain=ChainSettings(backend="local", local_path=folder / "chain.json"),
                auth=AuthSettings(),
                model=ModelSettings(preset="tiny"),
                data=DataSettings(source="local", local_root=corpus, local_pattern="*.txt"),
            )
            orchestrator.db.close()  # only the routes are read, never the state
            return create_app(orchestrator)
        finally:
            os.chdir(home)


# ---------------------------------------------------------------------------------------------------------
# What the schema does not say: errors reachable from an endpoint


@dataclass
class _Func:
    where: str
    raises: list[tuple[int, str, str]] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)


def _text(node: ast.expr | None) -> str:
    """An error message as a reader sees it: f-string fields become `…`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "…" for v in node.values
        )
    return ""


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _analyse(name: str, where: str, node: ast.AST, codes: dict[int, str]) -> _Func:
    func = _Func(where=where)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and (callee := _callee(sub)):
            func.calls.add(callee)
        if not (isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call)):
            continue
        call, callee = sub.exc, _callee(sub.exc)
        args = list(call.args)
        kwargs = {k.arg: k.value for k in call.keywords if k.arg}
        if callee == "RequestRejected" and len(args) >= 2:
            status, code = args[0], args[1]
            if isinstance(status, ast.Constant) and isinstance(code, ast.Constant):
                func.raises.append(
                    (int(status.value), str(code.value), _text(args[2] if len(args) > 2 else None))
                )
        elif callee == "HTTPException":
            status = args[0] if args else kwargs.get("status_code")
            detail = args[1] if len(args) > 1 else kwargs.get("detail")
            if isinstance(status, ast.Constant) and isinstance(status.value, int):
                code = codes.get(status.value, f"http_{status.value}")
                func.raises.append((status.value, code, _text(detail)))
    return func


def _functions(
    tree: ast.Module, module: str, codes: dict[int, str], *, routes: bool = True
) -> Iterator[tuple[str, _Func]]:
    """Module-level functions and methods; with `routes=False`, decorated module-level functions (the
    route endpoints of a router module) are left out."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if routes or not node.decorator_list:
                yield node.name, _analyse(node.name, f"{module}.{node.name}", node, codes)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    where = f"{module}.{node.name}.{item.name}"
                    yield item.name, _analyse(item.name, where, item, codes)


class ErrorIndex:
    """Every function and method of the orchestrator package (routers aside), by name."""

    def __init__(self, package: Path, codes: dict[int, str]) -> None:
        self.codes = codes
        self.by_name: dict[str, list[_Func]] = {}
        for path in sorted(package.glob("*.py")):
            module = f"{package.name}.{path.stem}"
            for name, func in _functions(ast.parse(path.read_text()), module, codes):
                self.by_name.setdefault(name, []).append(func)

    def errors(self, *starts: Callable[..., Any]) -> list[tuple[int, str, str]]:
        """(status, code, message) of every error the calls of `starts` (an endpoint and its dependencies)
        can raise, sorted and distinct."""
        found: dict[tuple[int, str], str] = {}
        for start in starts:
            module = sys.modules[start.__module__]
            tree = ast.parse(inspect.getsource(module))
            node = ast.parse(textwrap.dedent(inspect.getsource(start))).body[0]
            where = f"{module.__name__}.{start.__qualname__}"
            # The module's own helpers (say a router's `_same_run`), not a router's other endpoints.
            local = dict(_functions(tree, module.__name__, self.codes, routes=False))
            seen: set[str] = set()
            todo = [_analyse(start.__name__, where, node, self.codes)]
            while todo:
                func = todo.pop()
                if func.where in seen:
                    continue
                seen.add(func.where)
                for status, code, message in func.raises:
                    found.setdefault((status, code), message)
                for name in sorted(func.calls):
                    todo.extend([local[name]] if name in local else self.by_name.get(name, []))
        return [(status, code, found[(status, code)]) for status, code in sorted(found)]


def _api_routes(app: Any) -> Iterator[tuple[str, Any]]:
    """(path as served, route) for every APIRoute. Newer FastAPI keeps included routers lazy (their routes
    are reached through `iter_route_contexts`); older versions list every route in `app.routes`."""
    from fastapi.routing import APIRoute

    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:
        for route in app.routes:
            if isinstance(route, APIRoute):
                yield route.path, route
        return
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            yield context.path or context.original_route.path, context.original_route


def _dependency_calls(dependant: Any) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _dependency_calls(dep)


def _error_sources(route: Any) -> list[Callable[..., Any]]:
    """The endpoint and the functions of its dependencies (a dependency object's `__call__`), without the
    signature checks (`deps.signed`, `deps.validator`), whose errors the reference lists once for all."""
    from orchestrator import deps

    sources = [route.endpoint]
    for call in _dependency_calls(route.dependant):
        if call in (deps.signed, deps.validator):
            continue
        func = call if inspect.isfunction(call) else type(call).__call__
        if func not in sources:
            sources.append(func)
    return sources


# ---------------------------------------------------------------------------------------------------------
# Markdown


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _markdown(text: str) -> list[str]:
    """A docstring as markdown lines: a paragraph's lines joined, `- ` items kept as a list."""
    blocks: list[str] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line:
            if blocks and blocks[-1]:
                blocks.append("")
        elif line.startswith("- ") or not blocks or not blocks[-1]:
            if line.startswith("- ") and blocks and blocks[-1] and not blocks[-1].startswith("- "):
                blocks.append("")  # markdown needs a blank line before a list
            blocks.append(line)
        else:
            blocks[-1] += " " + line
    return blocks


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _link(name: str) -> str:
    return f"[{name}](#{slug(name)})"


def _type(schema: dict[str, Any]) -> str:
    """A JSON schema as a short type: `integer`, `list of [X](#x)`, `"a" or "b"`, `X or null`."""
    if "$ref" in schema:
        return _link(_ref_name(schema["$ref"]))
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(s) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s) for s in schema["prefixItems"]) + "]"
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"map of string to {_type(extra)}" if isinstance(extra, dict) else "object"
    if isinstance(kind, list):
        return " or ".join(kind)
    return str(kind) if kind else "any"


_CONSTRAINTS = [
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("minLength", "length ≥ {}"),
    ("maxLength", "length ≤ {}"),
    ("minItems", "≥ {} items"),
    ("maxItems", "≤ {} items"),
    ("pattern", "matches `{}`"),
    ("format", "format {}"),
]


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _constraints(schema: dict[str, Any]) -> str:
    parts = [fmt.format(_number(schema[key])) for key, fmt in _CONSTRAINTS if key in schema]
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            if c := _constraints(sub):
                parts.append(c)
    return ", ".join(parts)


def _field_rows(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = ["| field | type | required | constraints | description |", "| --- | --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            need = "yes"
        elif "default" in prop:
            need = f"no, default `{json.dumps(prop['default'])}`"
        else:
            need = "no"
        rows.append(
            f"| `{name}` | {_cell(_type(prop))} | {need} | {_cell(_constraints(prop))} | "
            f"{_cell(prop.get('description', ''))} |"
        )
    return rows


@dataclass
class RouteDoc:
    """What the reference says of one route."""

    method: str
    path: str
    tag: str
    auth: str
    summary: str
    in_schema: bool
    request: str | None
    response: str
    parameters: list[dict[str, Any]]
    errors: list[tuple[int, str, str]]

    @property
    def title(self) -> str:
        return f"`{self.method} {self.path}`"


_AUTH_TEXT = {
    "public": "public (no signature)",
    "signed": "signed: a hotkey registered on the subnet",
    "validator": "signed: a hotkey with a validator permit and at least `IOTA_ORCH_VALIDATOR_MIN_STAKE` "
    "stake",
}


def _response(operation: dict[str, Any] | None, route: Any) -> tuple[str, set[str]]:
    """How the 200 answer is described, and the schema names it refers to."""
    content = ((operation or {}).get("responses", {}).get("200", {}) or {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    refs = {_ref_name(r) for r in _refs(schema)} if schema else set()
    if schema:
        return _type(schema), refs
    if content:
        return ", ".join(f"`{media}`" for media in content), refs
    media = getattr(route.response_class, "media_type", None)
    return (f"`{media}`" if media else "any body"), refs


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def collect(app: Any) -> tuple[list[RouteDoc], dict[str, dict[str, Any]], dict[int, str]]:
    """The endpoints, the schemas they use (by name), and the app's status-to-code table."""
    import orchestrator
    from common import protocol
    from common.protocol.endpoints import ENDPOINTS
    from orchestrator import app as app_module

    codes: dict[int, str] = dict(app_module._CODES)
    index = ErrorIndex(Path(orchestrator.__file__).parent, codes)
    openapi = app.openapi()
    schemas: dict[str, dict[str, Any]] = {
        name: s for name, s in openapi.get("components", {}).get("schemas", {}).items()
    }
    table = {(e.method, e.path): e for e in ENDPOINTS}
    used: set[str] = set()
    endpoints: list[RouteDoc] = []
    for path, route in _api_routes(app):
        for method in sorted(route.methods):
            entry = table.pop((method, path), None)
            if entry is None:
                raise RuntimeError(f"{method} {path} is served but not in common/protocol/endpoints.py")
            request = None
            if entry.request is not None:
                request = entry.request.__name__
                definition = entry.request.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in definition.pop("$defs", {}).items():
                    schemas.setdefault(name, sub)
                schemas.setdefault(request, definition)
                used.update([request, *(_ref_name(r) for r in _refs(definition))])
            operation = openapi.get("paths", {}).get(path, {}).get(method.lower())
            response, refs = _response(operation, route)
            used.update(refs)
            summary = route.summary or inspect.getdoc(route.endpoint) or ""
            endpoints.append(
                RouteDoc(
                    method=method,
                    path=path,
                    tag=str(route.tags[0]) if route.tags else "other",
                    auth=entry.auth.value,
                    summary=summary,
                    in_schema=operation is not None,
                    request=request,
                    response=response,
                    parameters=list((operation or {}).get("parameters", [])),
                    errors=index.errors(*_error_sources(route)),
                )
            )
    if table:
        raise RuntimeError(f"in the table but not served: {', '.join(f'{m} {p}' for m, p in table)}")
    documented = {(e.method.lower(), e.path) for e in endpoints}
    for path, operations in openapi.get("paths", {}).items():
        for method in operations:
            if (method, path) not in documented:
                raise RuntimeError(f"{method.upper()} {path} is in the OpenAPI schema but no route was found")
    used.add("ErrorBody")
    schemas.setdefault("ErrorBody", protocol.ErrorBody.model_json_schema())
    # Close over references: a schema used by a used schema is used.
    todo = list(used)
    while todo:
        for ref in _refs(schemas.get(todo.pop(), {})):
            if (name := _ref_name(ref)) not in used:
                used.add(name)
                todo.append(name)
    order = {tag: i for i, tag in enumerate(_TAG_ORDER)}
    endpoints.sort(key=lambda e: order.get(e.tag, len(order)))  # stable: registration order within a tag
    return endpoints, {n: schemas[n] for n in sorted(used - _FASTAPI_MODELS) if n in schemas}, codes


def _auth_errors(codes: dict[int, str]) -> list[tuple[int, str, str, str]]:
    from common.auth import CLOCK_SKEW

    return [
        (
            401,
            codes[401],
            "signed",
            "missing or malformed Epistula headers, a bad signature, or a replayed uuid; "
            "`WWW-Authenticate: Epistula`",
        ),
        (
            401,
            CLOCK_SKEW,
            "signed",
            "the timestamp is further than `IOTA_AUTH_FRESHNESS_WINDOW_MS` from the orchestrator's clock "
            "(the detail says how far, either way): fix the sender's clock, then retry",
        ),
        (
            403,
            codes[403],
            "signed",
            "the hotkey is not registered on the subnet (the metagraph is refreshed "
            "in the background; registering and retrying works)",
        ),
        (413, codes[413], "signed", "the body is larger than `IOTA_AUTH_MAX_BODY_BYTES`"),
        (
            429,
            codes[429],
            "signed",
            "this hotkey sent more than `IOTA_AUTH_RATE_BURST` requests at once or `IOTA_AUTH_RATE_PER_S` "
            "sustained; retry after `Retry-After` seconds (forged or replayed requests spend no budget)",
        ),
        (
            503,
            codes[503],
            "signed",
            "the replay cache is full (`IOTA_AUTH_REPLAY_CACHE_SIZE`); retry after `Retry-After` seconds",
        ),
        (
            403,
            "not_a_validator",
            "validator",
            "no validator permit, or less stake than `IOTA_ORCH_VALIDATOR_MIN_STAKE`",
        ),
    ]


def render(endpoints: list[RouteDoc], schemas: dict[str, dict[str, Any]], codes: dict[int, str]) -> str:
    from common.protocol import HEADER_PROTOCOL, PROTOCOL_VERSION

    out: list[str] = [
        BEGIN,
        "<!-- Written by `python scripts/protocol_doc.py` from the orchestrator's OpenAPI schema and code; "
        "do not edit by hand. -->",
        "",
        f"## Endpoints (protocol {PROTOCOL_VERSION})",
        "",
        "| method | path | auth | request | response |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in endpoints:
        request = _link(e.request) if e.request else "-"
        out.append(
            f"| {e.method} | [`{e.path}`](#{slug(e.title)}) | {e.auth} | {request} | {_cell(e.response)} |"
        )
    out += [
        "",
        "## Error codes",
        "",
        'Every error answer is an [ErrorBody](#errorbody): `{"code": ..., "detail": ...}`. `code` is '
        "stable and meant for programs; `detail` is for people.",
        "",
        "Any route:",
        "",
        "| status | code | when |",
        "| --- | --- | --- |",
        f"| 426 | `protocol_mismatch` | the request's `{HEADER_PROTOCOL}` header is not {PROTOCOL_VERSION} |",
        f"| 404 | `{codes[404]}` | no such path |",
        f"| 405 | `{codes[405]}` | the path exists, the method does not |",
        "| 422 | `invalid_request` | a query parameter is missing or out of range |",
        "| 500 | `internal_error` | a fault in the orchestrator; the detail names no internals |",
        "",
        "Signed routes (`signed`, `validator`), before the route runs:",
        "",
        "| status | code | routes | when |",
        "| --- | --- | --- | --- |",
    ]
    for status, code, who, when in _auth_errors(codes):
        out.append(f"| {status} | `{code}` | {who} | {when} |")
    for e in endpoints:
        out += ["", f"### {e.title}", ""]
        if e.summary:
            out += [*_markdown(e.summary), ""]
        out.append(f"- auth: {_AUTH_TEXT[e.auth]}")
        if e.request:
            out.append(f"- request body: {_link(e.request)} (JSON, signed)")
        out.append(f"- response: {e.response}")
        if not e.in_schema:
            out.append("- not listed in the OpenAPI schema (`include_in_schema=False`)")
        if e.parameters:
            out += ["", "| query parameter | type | required | constraints |", "| --- | --- | --- | --- |"]
            for p in e.parameters:
                schema = p.get("schema", {})
                need = "yes" if p.get("required") else f"no, default `{json.dumps(schema.get('default'))}`"
                out.append(
                    f"| `{p['name']}` | {_cell(_type(schema))} | {need} | {_cell(_constraints(schema))} |"
                )
        if e.errors:
            out += ["", "| status | code | detail |", "| --- | --- | --- |"]
            out += [
                f"| {status} | `{code}` | {_cell(message or '…')} |" for status, code, message in e.errors
            ]
    out += ["", "## Schemas", ""]
    out.append(
        "Models from `common/protocol/`. Every message refuses unknown fields, so a typo or a field from "
        "another protocol version fails loudly (422)."
    )
    for name, schema in schemas.items():
        out += ["", f"### {name}", ""]
        if description := schema.get("description"):
            out += [*_markdown(description), ""]
        if schema.get("properties"):
            out += _field_rows(schema)
        elif "enum" in schema or "type" in schema:
            out.append(f"Type: {_type(schema)}.")
    out += ["", END]
    return "\n".join(out)


def generate() -> str:
    """The generated part of docs/protocol.md, markers included."""
    return render(*collect(build_app()))


def splice(document: str, generated: str) -> str:
    """`document` with the part between the markers replaced by `generated`."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise SystemExit(
            f"{DOC}: the markers {BEGIN} and {END} are missing; add them where the reference goes"
        )
    return document[:start] + generated + document[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if the file is stale")
    parser.add_argument(
        "--path", type=Path, default=DOC, help=f"the document (default {DOC.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    current = args.path.read_text()
    wanted = splice(current, generate())
    if args.check:
        if current == wanted:
            print(f"{args.path} is current")
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            wanted.splitlines(keepends=True),
            f"{args.path} (on disk)",
            f"{args.path} (from the code)",
        )
        sys.stdout.writelines(diff)
        print(
            f"\n{args.path} is stale: run `python scripts/protocol_doc.py` and commit the result",
            file=sys.stderr,
        )
        return 1
    if current != wanted:
        args.path.write_text(wanted)
        print(f"wrote {args.path}")
    else:
        print(f"{args.path} is already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
