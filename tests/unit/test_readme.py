"""README.md and docs/ name only what exists.

The checks read Markdown code (inline code spans and fenced blocks) and links:

- ``make <target>``: the target is a rule in the Makefile (``VAR=value`` words after
  ``make`` are skipped).
- ``medimg <command> --option``: the command is registered on the typer app of
  ``medimg.cli``, and every ``--option`` after it, up to the end of the shell command, is
  one of that command's options. ``make`` and ``medimg`` count where they start a shell
  command (after any ``VAR=value`` words); a ``<placeholder>`` command is not checked.
- ``python -m <module>`` and ``torchrun ... -m <module>``: a module of this repository
  (``medimg``, ``pipelines``, ``bench``, ``tests``) is a file or package here.
- Parameter keys: a dotted name whose first part is a section of params.yaml
  (``train.classify.lr``) is a key path in params.yaml; a ``<placeholder>`` part
  (``train.<task>.pretrained``) stands for every section at that level.
- Repository paths, in README.md only: a word with a ``/`` in it (``docs/training.md``,
  ``bench/``), or a bare file name at the root with a config-like suffix (``params.yaml``,
  ``pyproject.toml``, ``dvc.lock``, ``mlflow.db``). A path is cut at its first part that holds
  a placeholder or wildcard (``models/<task>/model.pt`` is checked as ``models``); URIs
  (``models:/...``, ``sqlite:///...``), options, absolute paths (the user's own files,
  ``/path/to/export``) and paths outside the repository (``../...``) are not checked. A path
  passes if it exists relative to the repository root, or if it is on one line of the
  folder tree with a path that the project creates at run time: it is, contains or lies
  inside such a path. Those are the settings that params.yaml gives and medimg.config
  types as paths (``data.*``, ``tracking.artifacts``, ``predict.output``, ...; with
  ``load_params``' defaults for keys the file leaves out) and the file of a ``sqlite:///``
  URI (``tracking.uri``); the ``outs``, ``metrics`` and ``plots`` of dvc.yaml with
  ``${...}`` resolved from the params; ``dvc.lock`` (DVC writes it for dvc.yaml); and the
  Makefile's ``VENV``. So ``data/interim/qc.html`` passes (inside ``data/interim``),
  ``data/`` passes (it holds ``data/raw``), ``data/frobnicate.csv`` fails, and so does a
  ``medimg/`` module that does not exist. Paths are checked in README.md only: the docs
  describe modules as the code will be after a refactor (docs/architecture.md).
- Links: every relative Markdown link in README.md and docs/*.md points to an existing
  file, and a ``#fragment`` to a heading there (GitHub's anchor names).

Program output (fenced blocks tagged ``text``) is checked for paths only: it may quote a
mistyped key on purpose. Shell comments in fenced blocks are prose, not commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [
    "README.md",
    "ingest.md",
    "preprocessing.md",
    "training.md",
    "tracking.md",
    "orchestration.md",
    "deployment.md",
    "performance.md",
    "architecture.md",
]
README_MAX_WORDS = 1500  # a newcomer reads it in five minutes
REPO_PACKAGES = {"medimg", "pipelines", "bench", "tests"}
ROOT_SUFFIXES = {".yaml", ".yml", ".toml", ".lock", ".db", ".py", ".cfg", ".ini"}
OUTPUT_LANGS = {"text"}  # fenced program output
FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([^\n`]*)\n(.*?)^\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")
SEPARATOR = re.compile(r"&&|\|\||[;|]")
PLACEHOLDER = re.compile(r"[<>*{}\[\]$]")
RULE = re.compile(r"^([^\s:#=$.][^:=]*?)\s*::?(?!=)(.*)$")


@dataclass(frozen=True)
class Code:
    """A piece of Markdown code: a fenced block (``lang`` its tag, "" for none) or an
    inline span (``lang`` None)."""

    text: str
    lang: str | None

    @property
    def is_output(self) -> bool:
        return self.lang is not None and self.lang.split(" ")[0] in OUTPUT_LANGS


def code_in(markdown: str) -> list[Code]:
    """Fenced blocks first, then the inline spans of the text between them."""
    blocks = [Code(m.group(3), m.group(2).strip()) for m in FENCE.finditer(markdown)]
    rest = FENCE.sub("\n", markdown)
    return blocks + [Code(m.group(2), None) for m in SPAN.finditer(rest)]


def prose_of(markdown: str) -> str:
    """The text with its code left out (links inside code are not links)."""
    return SPAN.sub("", FENCE.sub("\n", markdown))


def command_lines(code: Code) -> Iterator[list[str]]:
    """The shell commands in ``code`` as word lists, comments dropped."""
    for line in code.text.splitlines():
        if code.lang is not None:
            line = re.sub(r"(^|\s)#.*$", "", line)
        for part in SEPARATOR.split(line):
            words = [w.strip("\"'[](),") for w in part.split()]
            words = [w for w in words if w]
            if words:
                yield words


def _commands(markdown: str) -> Iterator[list[str]]:
    for code in code_in(markdown):
        if not code.is_output:
            yield from command_lines(code)


def _after(words: list[str], program: str) -> Iterator[list[str]]:
    """The words after ``program`` (also as ``.venv/bin/program``) when the command calls
    it: it comes first, after any ``VAR=value`` words (elsewhere it is an argument, as in
    ``prefect worker start -p medimg``)."""
    i = next((i for i, w in enumerate(words) if "=" not in w), len(words))
    if i < len(words) and (words[i] == program or words[i].endswith("/" + program)):
        yield words[i + 1 :]


# ----------------------------------------------------------------------------- make


def make_targets(makefile: str) -> set[str]:
    """The targets of the Makefile's rules (not target-specific variable lines)."""
    targets: set[str] = set()
    for line in makefile.splitlines():
        match = RULE.match(line)
        if match and "=" not in match.group(2).split("#")[0]:
            targets.update(t for t in match.group(1).split() if "$" not in t)
    return targets


def named_make_targets(markdown: str) -> list[str]:
    named = []
    for words in _commands(markdown):
        for rest in _after(words, "make"):
            target = next((w for w in rest if "=" not in w), None)
            if target is not None and not target.startswith("-"):
                named.append(target)
    return named


def missing_make_targets(markdown: str, targets: set[str]) -> list[str]:
    return [f"make {t}" for t in named_make_targets(markdown) if t not in targets]


# ----------------------------------------------------------------------------- medimg


@cache
def cli_commands() -> dict[str, set[str]]:
    """Each ``medimg`` subcommand with its options, read from the typer app."""
    from typer.main import get_command

    from medimg.cli import app

    def options(command: Any) -> set[str]:
        return {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}

    group: Any = get_command(app)
    found = {}
    for name, command in group.commands.items():
        found[name] = options(command)
        for sub, inner in getattr(command, "commands", {}).items():  # `medimg pacs pull`
            found[f"{name} {sub}"] = options(inner)
    return found


def named_cli_calls(markdown: str) -> list[tuple[str, list[str], list[str]]]:
    """(subcommand, its --options, the words after it) for every ``medimg ...`` call."""
    calls = []
    for words in _commands(markdown):
        for rest in _after(words, "medimg"):
            args = [w for w in rest if not w.startswith("-")]
            if args and not args[0].startswith("<"):  # `medimg <stage>`: any command
                i = rest.index(args[0])
                options = [w.split("=")[0] for w in rest[i + 1 :] if w.startswith("--")]
                calls.append((args[0], options, rest[i + 1 :]))
    return calls


def unknown_cli_calls(markdown: str, commands: dict[str, set[str]]) -> list[str]:
    unknown = []
    for name, options, words in named_cli_calls(markdown):
        later = [w for w in words if not w.startswith("-")]
        if later and f"{name} {later[0]}" in commands:  # a command of a group
            name = f"{name} {later[0]}"
        if name not in commands:
            unknown.append(f"medimg {name}")
        else:
            unknown += [f"medimg {name} {o}" for o in options if o not in commands[name]]
    return unknown


# ----------------------------------------------------------------------------- modules


def missing_modules(markdown: str, repo: Path) -> list[str]:
    missing = []
    for words in _commands(markdown):
        for i, word in enumerate(words[:-1]):
            module = words[i + 1]
            if word != "-m" or module.split(".")[0] not in REPO_PACKAGES:
                continue
            base = repo.joinpath(*module.split("."))
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                missing.append(f"-m {module}")
    return missing


# ----------------------------------------------------------------------------- params


def _has_key(tree: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    if not isinstance(tree, dict):
        return False
    head, rest = parts[0], parts[1:]
    if head.startswith("<"):
        sections = [v for v in tree.values() if isinstance(v, dict)]
        return bool(sections) and all(_has_key(v, rest) for v in sections)
    return head in tree and _has_key(tree[head], rest)


def named_params_keys(markdown: str, sections: Iterable[str]) -> list[str]:
    names = "|".join(re.escape(s) for s in sorted(sections, key=len, reverse=True))
    key = re.compile(rf"(?<![\w./:@$-])(?:{names})(?:\.(?:[A-Za-z_]\w*|<\w+>))+(?![\w/(<])")
    found = []
    for code in code_in(markdown):
        if code.is_output:
            continue
        for match in key.finditer(code.text):
            if "." + match.group(0).rsplit(".", 1)[1] not in ROOT_SUFFIXES | {".json", ".md"}:
                found.append(match.group(0))
    return found


def unknown_params_keys(markdown: str, params: dict[str, Any]) -> list[str]:
    return [k for k in named_params_keys(markdown, params) if not _has_key(params, k.split("."))]


# ----------------------------------------------------------------------------- paths


def _clean_path(word: str) -> PurePosixPath | None:
    """The repository path a word names, cut before its first placeholder; None if none."""
    word = word.strip("\"'([{").rstrip("\"')]},;:.")
    word = word.rsplit("=", 1)[-1]
    if not word or word.startswith(("-", "$", "/", "~", "..")) or SCHEME.match(word):
        return None
    word = word.split(":")[0]  # pipelines/pipeline.py:pipeline_flow
    if "/" not in word and PurePosixPath(word).suffix not in ROOT_SUFFIXES:
        return None
    parts = []
    for part in PurePosixPath(word).parts:
        if PLACEHOLDER.search(part):
            break
        parts.append(part)
    return PurePosixPath(*parts) if parts else None


def named_paths(markdown: str) -> list[PurePosixPath]:
    paths = []
    for code in code_in(markdown):
        for word in code.text.split():
            path = _clean_path(word)
            if path is not None:
                paths.append(path)
    return paths


def _path_settings(model: BaseModel) -> Iterator[str]:
    """The values of the settings that ``model`` types as paths, and sqlite files."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _path_settings(value)
        elif isinstance(value, Path):
            yield value.as_posix()
        elif isinstance(value, str) and value.startswith("sqlite:///"):
            yield value.removeprefix("sqlite:///")


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def declared_paths(params: BaseModel, dvc: dict[str, Any], makefile: str) -> set[str]:
    """The paths the project creates at run time (see the module docstring)."""
    raw = list(_path_settings(params))
    values = params.model_dump(mode="json")
    for stage in dvc.get("stages", {}).values():
        body, items = stage.get("do", stage), stage.get("foreach", [None])
        if isinstance(items, str):  # foreach: ${train.folds}, a list in the params
            items = _lookup(values, items.strip("${} "))
        for field in ("outs", "metrics", "plots"):
            for entry in body.get(field, []):
                for path in [entry] if isinstance(entry, str) else list(entry):
                    raw += [path.replace("${item}", str(item)) for item in items]
    for plot in dvc.get("plots", []):
        for spec in plot.values() if isinstance(plot, dict) else [plot]:
            raw += list(spec.get("y", {})) if isinstance(spec, dict) else [str(spec)]
    raw.append("dvc.lock")
    raw += re.findall(r"^VENV\s*\??=\s*(\S+)", makefile, re.M)
    resolved = (
        re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(values, m.group(1))), p) for p in raw
    )
    return {str(PurePosixPath(p)) for p in resolved if p.strip()}


def _related(path: PurePosixPath, other: PurePosixPath) -> bool:
    return path == other or path in other.parents or other in path.parents


def missing_paths(markdown: str, repo: Path, declared: set[str]) -> list[str]:
    runtime = [PurePosixPath(d) for d in declared]
    return [
        str(p)
        for p in named_paths(markdown)
        if not (repo / p).exists() and not any(_related(p, d) for d in runtime)
    ]


# ----------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor name of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("\n", markdown), re.M):
        slug = _slug(match.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(markdown: str, source: Path) -> list[str]:
    """Relative links of ``markdown`` (the text of ``source``) that lead nowhere."""
    broken = []
    for match in LINK.finditer(prose_of(markdown)):
        target = match.group(1)
        if SCHEME.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md":
            text = markdown if path == source else path.read_text(encoding="utf-8")
            if fragment not in anchors(text):
                broken.append(target)
    return broken


# ----------------------------------------------------------------------------- the repo


@cache
def repo_text(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


@cache
def repo_yaml(name: str) -> Any:
    return yaml.safe_load(repo_text(name))


def repo_declared_paths() -> set[str]:
    from medimg.config import load_params

    params = load_params(REPO / "params.yaml")
    return declared_paths(params, repo_yaml("dvc.yaml"), repo_text("Makefile"))


def _problems(markdown: str, source: Path) -> dict[str, list[str]]:
    params = repo_yaml("params.yaml")
    return {
        "make": missing_make_targets(markdown, make_targets(repo_text("Makefile"))),
        "medimg": unknown_cli_calls(markdown, cli_commands()),
        "modules": missing_modules(markdown, REPO),
        "params": unknown_params_keys(markdown, params),
        "links": broken_links(markdown, source),
    }


# ----------------------------------------------------------------------------- tests


def test_readme_is_short() -> None:
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail to docs/"


def test_readme_names_the_two_commands() -> None:
    named = named_make_targets(README.read_text(encoding="utf-8"))
    assert {"demo", "test"} <= set(named)


@pytest.mark.parametrize(
    "page", [README, *(DOCS / p for p in PAGES)], ids=lambda p: str(p.relative_to(REPO))
)
def test_commands_keys_and_links_exist(page: Path) -> None:
    problems = _problems(page.read_text(encoding="utf-8"), page)
    assert problems == {kind: [] for kind in problems}


def test_readme_paths_exist() -> None:
    text = README.read_text(encoding="utf-8")
    declared = repo_declared_paths()
    assert named_paths(text), "no paths found: the parser is broken"
    assert missing_paths(text, REPO, declared) == []


def test_every_docs_page_is_indexed() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    index = {Path(t.partition("#")[0]).name for t in LINK.findall(repo_text("docs/README.md"))}
    readme = {Path(t).name for t in LINK.findall(README.read_text(encoding="utf-8"))}
    assert set(PAGES) <= pages
    assert pages - {"README.md"} <= index
    assert pages <= readme


BOGUS = """
Run `make frobnicate`, then `medimg frobnicate` and `medimg predict --frobnicate 1`.
Set `train.classify.frobnicate: 3` and `train.<task>.frobnicate`; or run
`python -m pipelines.frobnicate`. See `docs/frobnicate.md`, `medimg/frobnicate.py`,
`data/frobnicate.csv`, [the guide](docs/frobnicate.md) and
[a section](docs/training.md#frobnicate).

```bash
make demo TORCH=cpu && make test  # make frobnicate-comment is a comment
make frobnicate-too
.venv/bin/medimg train --task classify --resume
```

```text
params.yaml: invalid parameters:
  synth.frobnicate: unknown key
```
"""


def test_checks_report_what_does_not_exist() -> None:
    declared = repo_declared_paths()
    problems = _problems(BOGUS, README)
    assert problems == {
        "make": ["make frobnicate-too", "make frobnicate"],
        "medimg": ["medimg frobnicate", "medimg predict --frobnicate"],
        "modules": ["-m pipelines.frobnicate"],
        "params": ["train.classify.frobnicate", "train.<task>.frobnicate"],
        "links": ["docs/frobnicate.md", "docs/training.md#frobnicate"],
    }
    assert missing_paths(BOGUS, REPO, declared) == [
        "docs/frobnicate.md",
        "medimg/frobnicate.py",
        "data/frobnicate.csv",
    ]


def test_runtime_paths_are_those_params_and_dvc_name() -> None:
    declared = repo_declared_paths()
    text = "`data/` `data/interim/qc.html` `models/<task>/model.pt` `mlflow.db` `dvc.lock`"
    assert {"data/interim", "models/segment/model.pt", "mlflow.db"} <= declared
    assert [str(p) for p in named_paths(text)] == [
        "data",
        "data/interim/qc.html",
        "models",
        "mlflow.db",
        "dvc.lock",
    ]
    assert missing_paths(text, REPO, declared) == []
