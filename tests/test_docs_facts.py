"""What the docs quote that can be checked against the code and against each other: every flag
in a documented train.py / evaluate.py command exists; seed loops in the recipes are at least
the number of pairs the docs say a result needs; the exact-test p floors they quote are 2/2^n;
GPU recipes carry the compile flags the README prescribes; no two pages share a title and a
link named after a page goes to it; the pages the CLIs point to exist.

(Links and their #anchors: tests/test_docs_links.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RECIPES = [ROOT / "README.md", ROOT / "docs" / "training.md"]  # the pages with seed-loop recipes
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "ten": 10}
GPU_FLAGS = (
    "--compile --compile-mode reduce-overhead"  # what the README tells GPU users to train MN with
)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shell_lines(block: str) -> list[str]:
    """A fenced block's command lines, backslash continuations joined, comments dropped, and
    ``$NAME`` expanded where the block assigns ``NAME="..."``."""
    joined = re.sub(r"\\\n\s*", " ", block)
    names: dict[str, str] = {}
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        m = re.match(r'^([A-Z_]+)="([^"]*)"$', line)
        if m:
            names[m.group(1)] = m.group(2)
            continue
        for name, value in names.items():
            line = line.replace(f'"${name}"', value).replace(f"${name}", value)
        if line:
            lines.append(line)
    return lines


def fenced_commands(path: Path) -> list[str]:
    return [
        line
        for block in FENCE.findall(path.read_text(encoding="utf-8"))
        for line in shell_lines(block)
    ]


def script_flags(line: str) -> list[tuple[str, list[str]]]:
    """[(command, flags)] of each train.py / evaluate.py SUBCOMMAND call in a shell line; command
    is "train" or the evaluate.py subcommand. Flags of other programs (torchrun, pip) are not
    collected: only what follows the script's name, up to the next ; | && or do/done; a command
    substitution ``$(...)`` builds arguments the shell alone can expand, and is skipped."""
    line = re.sub(r"\$\([^)]*\)", " ", line)
    try:
        tokens = shlex.split(line.replace(";", " ; "))
    except ValueError:
        tokens = line.split()
    calls = []
    for i, tok in enumerate(tokens):
        name = tok.rsplit("/", 1)[-1]
        if name not in ("train.py", "evaluate.py", "sweep.py") or "experiments" in tok:
            continue
        rest = tokens[i + 1 :]
        for j, t in enumerate(rest):
            if t in (";", "|", "&&", "||", "do", "done"):
                rest = rest[:j]
                break
        if name in ("evaluate.py", "sweep.py"):
            if not rest or not re.fullmatch(r"[a-z]+", rest[0]):  # no subcommand, or a placeholder
                continue
            command, rest = rest[0], rest[1:]
            if name == "sweep.py":  # its --train-flags and --arm NAME=FLAGS hold train.py flags
                command = f"sweep {command}"
                embedded, plain = [], []
                for j, t in enumerate(rest):
                    if j > 0 and rest[j - 1] in ("--train-flags", "--arm"):
                        embedded += [w for w in t.split("=", 1)[-1].split() if w.startswith("--")]
                    else:
                        plain.append(t)
                rest = plain
                calls.append(("train", embedded))
        else:
            command = "train"
        calls.append((command, [t.split("=", 1)[0] for t in rest if t.startswith("--")]))
    return calls


def known_flags() -> dict[str, set[str]]:
    """{"train" or an evaluate.py subcommand: its option names}, from the click commands themselves."""

    def options(command) -> set[str]:
        return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}

    evaluate, sweep = load_script("evaluate.py", "cli"), load_script("sweep.py", "cli")
    return {
        "train": options(load_script("train.py", "main")),
        **{name: options(cmd) for name, cmd in evaluate.commands.items()},
        **{f"sweep {name}": options(cmd) for name, cmd in sweep.commands.items()},
    }


# cli.md is --help itself
@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "cli.md"], ids=rel)
def test_documented_commands_use_flags_that_exist(page):
    known = known_flags()
    text = page.read_text(encoding="utf-8")
    inline = [span for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) if ".py" in span]
    wrong = []
    for line in [*fenced_commands(page), *inline]:
        for command, flags in script_flags(line):
            if command not in known:
                wrong.append(f"evaluate.py {command} (no such command): {line}")
                continue
            wrong += [f"{flag} ({command}): {line}" for flag in flags if flag not in known[command]]
    assert not wrong, f"{rel(page)}: flags the CLIs do not have:\n" + "\n".join(wrong)


def stated_minimum_pairs() -> int:
    """The number of seed pairs below which, docs/comparing.md says, no result can reach p < 0.05."""
    m = re.search(
        r"Below (\d+) pairs no result can reach p < 0\.05",
        (ROOT / "docs" / "comparing.md").read_text(),
    )
    assert m, "docs/comparing.md no longer states the minimum number of pairs"
    return int(m.group(1))


def test_the_stated_minimum_is_the_exact_tests_own():
    n = stated_minimum_pairs()
    assert 2 / 2**n < 0.05 <= 2 / 2 ** (n - 1)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_quoted_p_floors_are_two_over_two_to_the_n(page):
    """ "0.25 for 3 pairs, 0.031 for 6": each is the smallest p of an exact sign-flip test, 2/2^n."""
    text = " ".join(page.read_text(encoding="utf-8").split())
    quoted = []
    for clause in re.findall(r"((?:\d\.\d+ for \d+(?: pairs)?(?:, | and |,? )?){2,})", text):
        quoted += [(float(p), int(n)) for p, n in re.findall(r"(\d\.\d+) for (\d+)", clause)]
    assert quoted or page.name != "comparing.md", "docs/comparing.md no longer quotes the p floors"
    wrong = [(p, n) for p, n in quoted if abs(p - 2 / 2**n) > 0.0006]
    assert not wrong, f"{rel(page)}: p floors that are not 2/2^n: {wrong}"


@pytest.mark.parametrize("page", RECIPES, ids=rel)
def test_recipes_train_at_least_the_pairs_a_result_needs(page):
    minimum = stated_minimum_pairs()
    text = page.read_text(encoding="utf-8")
    loops = [
        len(m.split())
        for block in FENCE.findall(text)
        for m in re.findall(r"for seed in ([^;]+);", block)
    ]
    ranges = [
        int(b) - int(a) + 1
        for block in FENCE.findall(text)
        for a, b in re.findall(r"--seeds (\d+)-(\d+)", block)
    ]
    assert loops or ranges, f"{rel(page)}: no seed loop or sweep left to check"
    assert all(n >= minimum for n in loops + ranges), (rel(page), loops, ranges, minimum)
    said = [WORDS.get(w.lower(), w) for w in re.findall(r"\b(\w+) seeds per arm", text)]
    assert all(int(n) >= minimum for n in said), (rel(page), said)


@pytest.mark.parametrize("page", RECIPES, ids=rel)
def test_gpu_recipes_compile_as_the_readme_says(page):
    """The README tells GPU users to train with --compile --compile-mode reduce-overhead; every
    CIFAR-10 run of a seed-loop or sweep recipe (a GPU job) does."""
    assert GPU_FLAGS in (ROOT / "README.md").read_text()
    missing = []
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        for line in shell_lines(block):  # sweeps: every run gets --train-flags
            if (
                "sweep.py run" in line
                and "stacked" not in line
                and GPU_FLAGS not in " ".join(line.split())
            ):
                missing.append(line)
        if "for seed in" not in block:
            continue
        for line in shell_lines(block):
            if script_flags(line) and script_flags(line)[0][0] == "train" and "stacked" not in line:
                if GPU_FLAGS not in " ".join(line.split()):
                    missing.append(line)
    assert not missing, f"{rel(page)}: GPU runs without {GPU_FLAGS}: {missing}"


def titles() -> dict[Path, str]:
    out = {}
    for page in PAGES:
        m = re.search(r"^# (.+)$", page.read_text(encoding="utf-8"), re.M)
        if m:
            out[page] = m.group(1).strip()
    return out


def test_no_two_pages_share_a_title_and_links_named_after_a_page_go_there():
    """A page's name is its title up to the first colon ("Comparing runs: how to read ...");
    two pages with one name, or a link that says one page's name and goes to another, send a
    reader to the wrong page."""
    names: dict[str, Path] = {}
    for page, title in titles().items():
        name = title.split(":")[0].strip().lower()
        assert name not in names, f"{rel(page)} and {rel(names[name])} are both called {name!r}"
        names[name] = page
    wrong = []
    for page in [*PAGES, *(ROOT / "experiments").glob("*/README.md")]:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for label, target in re.findall(r"(?<!!)\[([^\]]+)\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            named = names.get(label.strip().lower())
            if named is not None and named != (page.parent / target).resolve():
                wrong.append(f"{rel(page)}: [{label}]({target}) (that name is {rel(named)})")
    assert not wrong, "\n".join(wrong)


def test_pages_the_code_points_to_exist():
    """Help texts and messages that send the user to a page: docs/<page>.md exists, and a README
    section named in quotes is a README heading."""
    readme_headings = set(re.findall(r"^#+ (.+?)\s*$", (ROOT / "README.md").read_text(), re.M))
    wrong = []
    for source in [ROOT / "train.py", ROOT / "evaluate.py", *(ROOT / "dcgan_mn").rglob("*.py")]:
        text = source.read_text(encoding="utf-8")
        wrong += [
            f"{rel(source)}: {page}"
            for page in re.findall(r"\bdocs/[\w.-]+\.md", text)
            if not (ROOT / page).is_file()
        ]
        wrong += [
            f"{rel(source)}: README section {s!r}"
            for s in re.findall(r"README,? [\"']([^\"']+)[\"']", text)
            if s not in readme_headings
        ]
    assert not wrong, wrong
