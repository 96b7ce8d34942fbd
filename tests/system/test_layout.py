"""The package's floor plan: the README's Layout section names every module of every room, and nothing
else; no module over 300 lines, no function over 60; every room says what it may import."""

import ast
import re

from support.paths import REPO

PACKAGE = REPO / "platform" / "liverseg"


def _readme_rooms() -> dict[str, set[str]]:
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    return {m[1]: set(m[2].split()) for m in re.finditer(r"^  (\w+)/ +([\w ]+)$", block, re.M)}


def test_readme_layout_lists_every_module_of_every_room():
    tree = {
        room.name: {f.stem for f in room.glob("*.py") if f.stem != "__init__"}
        for room in PACKAGE.iterdir()
        if room.is_dir() and (room / "__init__.py").exists()
    }
    assert _readme_rooms() == tree


def test_only_the_package_init_stays_at_the_top():
    assert sorted(f.name for f in PACKAGE.glob("*.py")) == ["__init__.py"]


def test_modules_and_functions_stay_small():
    too_big = []
    for f in sorted(PACKAGE.rglob("*.py")):
        src = f.read_text()
        if len(src.splitlines()) > 300:
            too_big.append(f"{f.relative_to(PACKAGE)}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_big.append(f"{f.relative_to(PACKAGE)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []


def test_every_room_says_what_it_may_import():
    for room in _readme_rooms():
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
        assert room == "cli" or "import" in doc.lower(), room


def test_liverseg_variables_are_read_in_one_module():
    """Every LIVERSEG_* environment variable is named and read in core/env.py only."""
    offenders = [
        f"{f.relative_to(PACKAGE)}:{n}"
        for f in PACKAGE.rglob("*.py")
        if f.name != "env.py"
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"""["']LIVERSEG_\w+["']""", line)
    ]
    assert offenders == []


def test_every_slow_suite_is_one_that_ci_runs():
    """A test moved out of the default suite is still run: every file with slow tests is in .ci/run's list."""
    script = (REPO / ".ci" / "run").read_text()
    listed = set(re.findall(r"^(tests/\S+\.py) \d+ (?:gate|first)$", script, re.M))
    slow = {
        f.relative_to(REPO).as_posix()
        for f in (REPO / "tests").rglob("test_*.py")
        if re.search(r"pytest\.mark\.slow", f.read_text())
    }
    assert slow - listed == set() and listed - slow == set()
