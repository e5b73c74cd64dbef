"""The repository as a reader meets it: the README's fork example runs as written, the files stand alone, and
imports run one way (fused_kernels -> sample -> teacher -> topd -> train -> toy / bench / reproduce on top)."""

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_using_topd_in_another_trainer_runs_as_written():
    """The README section "Using topd.py in another trainer" is executed exactly as printed there."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- example: another-trainer -->")[1].split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(block, "README.md:another-trainer", "exec"), namespace)
    history = namespace["history"]
    assert len(history) == 30
    assert history[-1]["opd/teacher_kl"] < 0.5 * history[0]["opd/teacher_kl"]  # the student moved to the teacher
    assert 0 < history[-1]["topd/nondiv_frac"] < 1  # some candidates were suppressed, some kept


def _tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_no_file_refers_to_a_path_outside_the_repository():
    """Whoever clones the repository has only the repository: no README line, docstring, comment or test may
    point at a sibling folder (the method, the traps table and the AIME data are shipped in docs/ and data/)."""
    outside = "../" + "shared"  # spelled in two pieces so that this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in _tracked_files()
                 if p.suffix in {".py", ".md", ".txt", ".ini", ""} and p.is_file() and outside in p.read_text()]
    assert offenders == []
    for needed in ("docs/method.md", "docs/traps.md", "data/aime24.jsonl", "data/aime25.jsonl", "data/README.md"):
        assert (ROOT / needed).is_file(), needed


def _imports():
    """{module: set of top-level project modules it imports anywhere in the file} for the repository's .py files."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for path in ROOT.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[path.stem] = (found & modules) - {path.stem}
    return graph


def test_imports_run_one_way():
    graph = _imports()
    order = ["fused_kernels", "parallel", "sample", "teacher", "topd", "checkpoint", "eval_aime", "toy", "train", "bench",
             "reproduce"]
    rank = {m: i for i, m in enumerate(order)}
    for module, deps in graph.items():
        if module in rank:
            for dep in deps:
                assert rank[dep] < rank[module], (module, dep)  # strictly downwards: no cycle possible
    assert "train" not in graph["toy"] and "train" not in graph["topd"]
    for core in ("fused_kernels", "parallel", "sample", "teacher", "topd"):
        assert not graph[core] & {"train", "toy", "bench", "reproduce"}, core


def test_every_test_named_in_the_traps_table_exists():
    """docs/traps.md names the regression test of each trap: a renamed or deleted test must not leave the table
    pointing at nothing."""
    import re

    named = set(re.findall(r"`(test_\w+)", (ROOT / "docs" / "traps.md").read_text()))
    defined = {node.name for path in (ROOT / "tests").glob("test_*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    assert len(named) >= 24
    assert sorted(named - defined) == []


def test_no_top_level_file_shadows_an_installed_package():
    """The flat files are importable by their bare names, so a file named like an installed package hides that
    package from every library that imports it. transformers 5.25 imports the `kernels` package (Hugging Face's hub
    kernels, one of its requirements) at model load: a top-level kernels.py made every from_pretrained fail with
    "cannot import name 'CUDAProperties' from 'kernels'". No stem may be the import name of an installed
    distribution (transformers' own requirements are installed wherever this repository runs)."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()  # import name -> distributions that ship it
    ours = {p.stem for p in ROOT.glob("*.py")} - {"conftest"}
    assert "transformers" in installed  # the map is real: the requirement we know is installed is in it
    assert sorted(ours & set(installed)) == []


def _readme_commands():
    """The runnable commands of the README's "## Two commands" block, continuation lines joined."""
    import re

    block = re.search(r"^## Two commands\n.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert block, "README.md has no '## Two commands' block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def test_the_readme_gives_the_main_job_and_the_test_command_ci_runs():
    """The front door holds exactly two runnable commands: the main job, and the test command that .ci/run runs,
    character for character. (An edit of a count once replaced the test command by a comment, and nobody noticed.)"""
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "pip install -r requirements.txt" in commands[0] and commands[0].endswith("train.py")
    ci = (ROOT / ".ci" / "run").read_text().split("# The README's test command.")[1]
    ci_command = next(line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#"))
    assert commands[1] == ci_command


def test_the_readme_is_a_front_door_and_its_numbers_are_the_records():
    """README.md stays a page a reader finishes (<= ~300 lines; the record lives in docs/), every docs/ link in it
    exists, and every row of its results table is a row of docs/results.md, so the two can never disagree."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    section = text.split("## Results\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) >= 3
    record = (ROOT / "docs" / "results.md").read_text()
    assert [row for row in rows if row not in record] == []
