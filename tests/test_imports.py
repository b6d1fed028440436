"""The floor plan: imports run one way, with no cycles and no imports hidden in functions.

Checked with ``ast`` over every module of the package, so the test needs no import of it.
Floors, lowest first: a module may import from its own floor or a lower one, never from a
higher one, and the module-level import graph has no cycle (within a floor either).
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "fairgen")
FLOORS = [
    {"config", "cli", "registry", "parallel", "storage", "checkpoint", "logs", "robust",
     "peers", "images", "compile_cache"},
    {"data", "metrics", "models", "classifiers", "privacy"},
    {"objectives", "fairness"},
    {"experiment"},
    {"sampling"},
    {"evaluation"},
    {"train", "audit"},
    {"main", "api"},
]
# The launcher defers its imports so that bad flags fail before JAX starts.
DEFERRED_IMPORTS_ALLOWED = {"fairgen.main"}


def _modules() -> dict[str, str]:
  """Module name -> path, for every .py file of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The package module that an imported dotted name refers to (None: not fairgen)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: str) -> list[tuple[str, bool, int]]:
  """(imported fairgen module, inside a function?, line) for every import of a file."""
  tree = ast.parse(open(path).read(), path)
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        names = [f"{child.module}.{a.name}" for a in child.names]
      for name in names:
        if name == "fairgen" or name.startswith("fairgen."):
          target = _resolve(name)
          if target and target != "fairgen":
            found.append((target, in_function, child.lineno))
      visit(child, nested)

  visit(tree, False)
  return found


def _floor(module: str) -> int:
  top = module.split(".")[1] if module.count(".") else ""
  for i, names in enumerate(FLOORS):
    if top in names:
      return i
  raise AssertionError(f"{module} is on no floor: add its package to FLOORS (and the "
                       f"the layout in docs/architecture.md).")


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_is_on_a_floor():
  for module in MODULES:
    if module != "fairgen":
      _floor(module)


def test_no_import_goes_up_a_floor():
  upward = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() if m != "fairgen"
            for t, _, line in edges if _floor(t) > _floor(m)]
  assert not upward, "\n".join(upward)


def test_no_function_local_imports_of_fairgen_modules():
  local = [f"{m}:{line} imports {t} inside a function" for m, edges in GRAPH.items()
           if m not in DEFERRED_IMPORTS_ALLOWED for t, inside, line in edges if inside]
  assert not local, "\n".join(local)


def test_no_import_cycles():
  edges = {m: sorted({t for t, inside, _ in e if not inside and t != m})
           for m, e in GRAPH.items()}
  # A package's __init__ importing its own submodules is how a registry is assembled;
  # a submodule importing its package's __init__ back would be the cycle.
  state, stack, cycles = {}, [], []

  def dfs(node: str) -> None:
    state[node] = "open"
    stack.append(node)
    for nxt in edges.get(node, []):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        dfs(nxt)
    stack.pop()
    state[node] = "done"

  for module in sorted(edges):
    if module not in state:
      dfs(module)
  assert not cycles, "\n".join(cycles)


def test_the_checker_finds_a_cycle_and_a_local_import(tmp_path):
  """The checks above are not vacuous: they see a planted upward and local import."""
  path = tmp_path / "planted.py"
  path.write_text("from fairgen import train\n\ndef f():\n  from fairgen.evaluation import runner\n")
  found = _imports(str(path))
  assert ("fairgen.train", False, 1) in found
  assert ("fairgen.evaluation.runner", True, 4) in found
  assert _floor("fairgen.train") > _floor("fairgen.config")


def _layout_block() -> str:
  text = open(os.path.join(REPO, "docs", "architecture.md")).read()
  return text.split("```text\n", 1)[1].split("```", 1)[0]


def test_the_documented_layout_matches_the_tree():
  block = _layout_block()
  named = set(re.findall(r"^  ([a-z_]+(?:\.py|/))", block, flags=re.M))
  on_disk = {n + ("/" if os.path.isdir(os.path.join(PACKAGE, n)) else "")
             for n in os.listdir(PACKAGE)
             if n.endswith(".py") and n != "__init__.py" or (
                 os.path.isdir(os.path.join(PACKAGE, n)) and n != "__pycache__")}
  assert named == on_disk, (sorted(named - on_disk), sorted(on_disk - named))
  # Every module the Layout names inside a package exists.
  for package, files in re.findall(r"^  ([a-z_]+)/\s+(.*(?:\n {19}.*)*)", block, flags=re.M):
    for name in re.findall(r"\b([a-z_]+\.py)\b", files):
      assert os.path.exists(os.path.join(PACKAGE, package, name)), f"{package}/{name}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "fairgen"))
def test_files_stay_under_about_500_lines(module):
  with open(MODULES[module]) as f:
    assert sum(1 for _ in f) <= 520, module


TEXT_ROOTS = ("fairgen", "tools", "experiments", "tests", "docs", "README.md")


def test_every_fairgen_path_named_in_the_text_exists():
  """Comments, docstrings and docs name only files that exist (``fairgen/...py``)."""
  stale = []
  for root in TEXT_ROOTS:
    top = os.path.join(REPO, root)
    paths = [top] if os.path.isfile(top) else [
        os.path.join(d, f) for d, _, files in os.walk(top) for f in files
        if f.endswith((".py", ".md"))]
    for path in paths:
      for number, line in enumerate(open(path, encoding="utf-8"), 1):
        for named in re.findall(r"\bfairgen/[A-Za-z0-9_/]+\.py\b", line):
          if not os.path.exists(os.path.join(REPO, named)):
            stale.append(f"{os.path.relpath(path, REPO)}:{number}: {named}")
  assert not stale, "\n".join(stale)


SCRIPT_ROOTS = ("tools", "experiments", "fairgen")
# The one definition of the bad-input line (``fairgen: error: ...``, exit status 2).
FAIL_HOME = os.path.join("fairgen", "cli.py")


def _python_files(roots: tuple[str, ...] = SCRIPT_ROOTS) -> list[str]:
  """Repository-relative paths of every .py file under ``roots``."""
  return sorted(os.path.relpath(os.path.join(d, f), REPO)
                for root in roots for d, _, files in os.walk(os.path.join(REPO, root))
                for f in files if f.endswith(".py"))


def _is_sys_path(node: ast.AST) -> bool:
  return (isinstance(node, ast.Attribute) and node.attr == "path"
          and isinstance(node.value, ast.Name) and node.value.id == "sys")


def _sys_path_edits(tree: ast.AST) -> list[int]:
  """Lines that assign to ``sys.path`` (or an item or slice of it) or call a method on it
  that changes it (insert, append, extend, ...)."""
  mutators = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__",
              "__iadd__"}
  lines = []
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Assign):
      targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
      targets = [node.target]
    elif isinstance(node, ast.Delete):
      targets = node.targets
    for target in targets:
      for part in ast.walk(target):
        if _is_sys_path(part) or (isinstance(part, ast.Subscript) and _is_sys_path(part.value)):
          lines.append(node.lineno)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in mutators and _is_sys_path(node.func.value)):
      lines.append(node.lineno)
  return sorted(set(lines))


def _fail_definitions(tree: ast.AST) -> list[int]:
  """Lines of functions named ``fail`` that are not methods (a class's ``fail`` is its own)."""
  methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
  return [n.lineno for n in ast.walk(tree)
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "fail"
          and id(n) not in methods]


def _parse(path: str) -> ast.AST:
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return ast.parse(f.read(), path)


def test_no_script_or_module_edits_sys_path():
  """fairgen is installed (``pip install -e .``); a script finds the modules beside it with
  ``fairgen.cli.import_beside``."""
  edits = [f"{p}:{line}" for p in _python_files() for line in _sys_path_edits(_parse(p))]
  assert not edits, "sys.path edited at:\n" + "\n".join(edits)


def test_fail_is_defined_once_in_fairgen_cli():
  found = [f"{p}:{line}" for p in _python_files() for line in _fail_definitions(_parse(p))]
  assert [f.split(":")[0] for f in found] == [FAIL_HOME], found


def test_the_script_checks_find_planted_edits():
  """The two checks above are not vacuous."""
  tree = ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path.append('y')\n"
                   "sys.path[:0] = ['z']\nsys.path = ['w']\nsys.path += ['v']\n"
                   "print(sys.path[0])\nsys.path.index('x')\n"
                   "def fail(m):\n  pass\n\nclass Dog:\n  def fail(self):\n    pass\n")
  assert _sys_path_edits(tree) == [2, 3, 4, 5, 6]
  assert _fail_definitions(tree) == [9]


def test_every_feature_switch_finds_its_text_once():
  """``tests/feature_switches.py`` names the exact text that wires each feature in; a
  refactor that moves it must move the switch too, or the switch would test nothing."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "feature_switch.py"),
                           "--check"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "stale: none" in result.stdout
