"""Every command the README and docs/*.md show must still work as written, so the pages cannot drift from the CLI.

What is checked, per page (all in-process and fast; nothing is run, trained or loaded):
- each `rag-dpo SUB ...` (also `.venv/bin/rag-dpo`, `-m rag_dpo.cli SUB`) in a shell code block or an inline code
  span: SUB is a subcommand whose `--help` exits 0, every `--option` it shows is one of SUB's options, and a
  code-block command without placeholders parses whole (required arguments, option types);
- `rag-dpo train RECIPE key=value ...` and `rag-dpo compare RECIPE ...` with a concrete recipe: the recipe loads
  with those overrides (`load_recipe` / `load_compare_config` validate every key), and so does
  `make TARGET OVERRIDES="..."` for the recipe that TARGET runs;
- each `make TARGET` names a target of the Makefile;
- each recipe path (`recipes/*.yaml`, brace lists expanded), bench script (`bench/*.py`) and relative link names a
  file that exists.
Placeholders (`RUN_DIR`, `<name>`, `[--corpus PATH]`, `...`) are read as such: options inside brackets are still
checked, placeholder recipes and overrides are not loaded.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
LAUNCHER_WORDS = {"time", "/usr/bin/time", "-v", "nice", "-n", "19", "5", "sudo"}


@dataclass
class Command:
    page: str
    line: int
    text: str
    block: bool = True    # from a shell code block (a command to copy), not an inline span in prose

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text.strip()[:100]}"


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:            # an apostrophe in prose-like text: fall back to whitespace
        return text.split("#")[0].split()


def _read(page: Path, text: str | None) -> tuple[str, str]:
    return str(page.relative_to(ROOT)), page.read_text(encoding="utf-8") if text is None else text


def commands(page: Path, text: str | None = None) -> list[Command]:
    """Shell lines of fenced shell blocks (continuations joined) and inline code spans that start a command."""
    name, text = _read(page, text)
    lines = text.splitlines()
    out: list[Command] = []
    prose = []
    lang, buf, start = None, "", 0
    for i, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            lang = fence.group(1).lower() if lang is None else None
            prose.append("")
            continue
        if lang is None:
            prose.append(line)
            continue
        prose.append("")
        if lang not in SHELL_LANGS:
            continue
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(Command(name, start, buf + line))
        buf = ""
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        if re.match(r"(\S*/)?rag-dpo |make |\S*python -m rag_dpo\.cli |torchrun |accelerate launch ", span):
            out.append(Command(name, text.count("\n", 0, m.start()) + 1, span, block=False))
    return out


def _strip(tok: str) -> str:
    return tok.strip("[](){},")


def _placeholder(tok: str) -> bool:
    """RUN_DIR, P, <name>, ..., {a,b}: words that stand for something the reader fills in."""
    t = _strip(tok)
    return (not t or "<" in t or "..." in t or "…" in t or "*" in t or "$" in t
            or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", t)))


def rag_dpo_calls(cmd: Command) -> list[list[str]]:
    """[subcommand, args...] for every rag-dpo invocation in the command line."""
    toks = _tokens(cmd.text)
    calls = []
    for i, tok in enumerate(toks):
        cli = tok == "rag-dpo" or tok.endswith("/rag-dpo") or (tok == "rag_dpo.cli" and i and toks[i - 1] == "-m")
        if not cli or i + 1 >= len(toks):
            continue
        rest = []
        for t in toks[i + 1:]:
            if t in SEPARATORS:
                break
            rest.append(t)
        if rest and not rest[0].startswith("-") and not _placeholder(rest[0]):
            calls.append(rest)
    return calls


def make_calls(cmd: Command) -> list[tuple[list[str], dict[str, str]]]:
    """(targets, VAR=value assignments) for every `make` at the start of a command."""
    toks = _tokens(cmd.text)
    calls, at_start = [], True
    for i, tok in enumerate(toks):
        if tok in SEPARATORS:
            at_start = True
            continue
        if at_start and tok == "make":
            targets, assigns = [], {}
            for t in toks[i + 1:]:
                if t in SEPARATORS:
                    break
                if re.match(r"^[A-Z_][A-Z0-9_]*=", t):
                    k, v = t.split("=", 1)
                    assigns[k] = v
                elif not t.startswith("-"):
                    targets.append(t)
            calls.append((targets, assigns))
        at_start = at_start and (tok in LAUNCHER_WORDS or re.match(r"^[A-Z_][A-Z0-9_]*=", tok) is not None)
    return calls


@lru_cache(maxsize=None)
def cli_group():
    import typer.main

    from rag_dpo.cli import app
    return typer.main.get_command(app)


@lru_cache(maxsize=None)
def help_exit_code(sub: str) -> int:
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    return CliRunner().invoke(app, [sub, "--help"]).exit_code


def valued_options_of(sub: str) -> set[str]:
    """The options of `sub` that take a value (the next token is theirs)."""
    return {o for p in cli_group().commands[sub].params if not getattr(p, "is_flag", True)
            for o in p.opts if o.startswith("-")}


def options_of(sub: str) -> set[str]:
    cmd = cli_group().commands[sub]
    opts = {"--help"}
    for p in cmd.params:
        opts.update(o for o in list(p.opts) + list(p.secondary_opts) if o.startswith("-"))
    return opts


@lru_cache(maxsize=None)
def makefile_targets() -> dict[str, list[str]]:
    """target -> the rag-dpo command lines of its recipe."""
    targets: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*(?:\s+[A-Za-z0-9_][A-Za-z0-9_.-]*)*)\s*:(?!=)", line)
        if m:
            current = []
            for t in m.group(1).split():
                targets[t] = current
        elif line.startswith("\t") and "rag-dpo" in line:
            current.append(line.strip())
    return targets


def recipe_of_target(target: str) -> tuple[str, str, bool] | None:
    """('train' | 'compare', recipe path, --quick) of a Makefile target that runs one recipe."""
    for line in makefile_targets().get(target, []):
        m = re.search(r"rag-dpo (train|compare) (recipes/\S+\.yaml)", line)
        if m:
            return m.group(1), m.group(2), "--quick" in line
    return None


def load_with_overrides(sub: str, recipe: str, overrides: list[str], quick: bool = False) -> None:
    if sub == "train":
        from rag_dpo.pipeline.recipe import load_recipe
        load_recipe(ROOT / recipe, overrides)
    else:
        from rag_dpo.pipeline.compare import load_compare_config
        load_compare_config(str(ROOT / recipe), overrides, quick=quick)


def check_rag_dpo(cmd: Command, call: list[str]) -> list[str]:
    sub, args = call[0], call[1:]
    group = cli_group()
    if sub not in group.commands:
        return [f"{cmd.where()}: `rag-dpo {sub}` is not a subcommand (have: {', '.join(sorted(group.commands))})"]
    problems = []
    if help_exit_code(sub) != 0:
        problems.append(f"{cmd.where()}: `rag-dpo {sub} --help` exits {help_exit_code(sub)}")
    known = options_of(sub)
    concrete = not any(_placeholder(a) or a != _strip(a) for a in args)
    if cmd.block and concrete:            # a command to copy as is: it must parse whole (arguments, types)
        try:
            group.commands[sub].make_context(sub, list(args))
        except Exception as e:
            problems.append(f"{cmd.where()}: does not parse: {e}")
    for tok in args:
        t = _strip(tok)
        if re.match(r"^--[A-Za-z]", t) or re.fullmatch(r"-[A-Za-z]", t):
            if t.split("=", 1)[0] not in known:
                problems.append(f"{cmd.where()}: `rag-dpo {sub}` has no option {t.split('=', 1)[0]}")
    if sub in ("train", "compare") and args and re.fullmatch(r"recipes/\S+\.yaml", args[0]):
        recipe = args[0]
        if not (ROOT / recipe).is_file():
            return problems + [f"{cmd.where()}: no such recipe {recipe}"]
        overrides, skip = [], False
        takes_value = valued_options_of(sub)
        it = iter(args[1:])
        for tok in it:
            if tok.startswith("-"):
                if tok in takes_value:
                    next(it, None)
            elif "=" in tok and not any(_placeholder(part) for part in tok.split("=", 1)):
                overrides.append(tok)
            else:                    # `...`, `<gpu recipe>`, `key=VALUE`: an example to fill in, not to load
                skip = True
        if not skip:
            try:
                load_with_overrides(sub, recipe, overrides, quick="--quick" in args)
            except Exception as e:   # InputError names the key; anything else is a broken example too
                problems.append(f"{cmd.where()}: {recipe} with {overrides} does not load: {e}")
    return problems


def check_make(cmd: Command, targets: list[str], assigns: dict[str, str]) -> list[str]:
    problems = []
    for target in targets:
        if _placeholder(target):
            continue
        if target not in makefile_targets():
            problems.append(f"{cmd.where()}: the Makefile has no target {target!r}")
            continue
        run = recipe_of_target(target)
        if run and "OVERRIDES" in assigns:
            sub, recipe, quick = run
            overrides = _tokens(assigns["OVERRIDES"])
            if not any(_placeholder(o.split("=", 1)[-1]) for o in overrides):
                try:
                    load_with_overrides(sub, recipe, overrides, quick)
                except Exception as e:
                    problems.append(f"{cmd.where()}: make {target} OVERRIDES={overrides} does not load: {e}")
    return problems


def check_paths(page: Path, text: str | None = None) -> list[str]:
    """Recipe paths, bench scripts and relative links named anywhere on the page must exist."""
    name, text = _read(page, text)
    problems = []
    for m in re.finditer(r"\b(recipes|bench)/([A-Za-z0-9_./{},-]+?\.(?:yaml|py))\b", text):
        folder, rest = m.groups()
        brace = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", rest)
        names = [brace.group(1) + x + brace.group(3) for x in brace.group(2).split(",")] if brace else [rest]
        for n in names:
            if not any(c in n for c in "<*{}") and not (ROOT / folder / n).is_file():
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{name}:{line}: no such file {folder}/{n}")
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1).split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        if not (page.parent / target).exists():
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{name}:{line}: link to a missing file {m.group(1)}")
    return problems


def page_problems(page: Path, text: str | None = None) -> list[str]:
    problems = check_paths(page, text)
    for cmd in commands(page, text):
        for call in rag_dpo_calls(cmd):
            problems += check_rag_dpo(cmd, call)
        for targets, assigns in make_calls(cmd):
            problems += check_make(cmd, targets, assigns)
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_on_the_page_parses(page):
    problems = page_problems(page)
    assert not problems, "\n".join(problems)


def test_the_pages_show_commands_at_all():
    """The checks above see the quickstart: if the parser missed code blocks, they would pass vacuously."""
    readme = commands(ROOT / "README.md")
    subs = {call[0] for c in readme for call in rag_dpo_calls(c)}
    targets = {t for c in readme for ts, _ in make_calls(c) for t in ts}
    assert {"train", "eval", "annotate", "pairs", "data", "retrieve"} <= subs
    assert {"train-dpo", "test", "eval", "compare"} <= targets


def test_a_broken_page_is_caught():
    page = ROOT / "docs" / "__broken_example__.md"       # never written: its text is passed in
    body = """# broken
```bash
rag-dpo trian recipes/dpo_step.yaml          # misspelt subcommand
rag-dpo eval --policy P --no-such-flag       # unknown option
rag-dpo train recipes/dpo_step.yaml trainer.no_such_field=1
rag-dpo train recipes/missing.yaml
rag-dpo retrieve data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl --k five
make train-dop
make train-dpo OVERRIDES="rollout.kk=2"
```
Run `rag-dpo pairs --labels L --rulez x` with [the recipe](../recipes/nope.yaml), see `recipes/gpu/nope.yaml`.
"""
    problems = "\n".join(page_problems(page, body))
    for expected in ["`rag-dpo trian` is not a subcommand", "has no option --no-such-flag",
                     "trainer.no_such_field", "no such recipe recipes/missing.yaml", "no target 'train-dop'",
                     "rollout.kk", "has no option --rulez", "link to a missing file ../recipes/nope.yaml",
                     "no such file recipes/gpu/nope.yaml", "--k five: does not parse"]:
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


def test_each_subcommand_is_registered_once():
    """Two stages registering one name would leave only the last one reachable, silently."""
    from collections import Counter

    from rag_dpo.cli import app
    names = Counter(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)
    assert names["compare"] == 1 and names["train"] == 1
    assert [n for n, k in names.items() if k > 1] == []
