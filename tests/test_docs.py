"""The docs site builds without warnings, and every command in the README and the docs runs.

``tools/doc_commands.py`` finds each fenced block and its marker. The smoke blocks of every
page run here in their smoke form, pages in the README-then-docs order, sharing one
directory, so a command that two pages share (the main job's training) runs once; each
page's own blocks run in order, so a page can train and then evaluate.
"""

import os
import re
import subprocess

import pytest

from conftest import REPO, subprocess_env
from fairgen import cli

doc_commands = cli.load_module(os.path.join(REPO, "tools", "doc_commands.py"))
PAGES = doc_commands.doc_files()
ALL_BLOCKS = [b for page in PAGES for b in doc_commands.blocks(page)]


def test_docs_build_without_warnings(tmp_path):
  """Sphinx + MyST, offline, warnings as errors (broken links, unparsable docstrings)."""
  out = tmp_path / "html"
  result = subprocess.run(doc_commands.sphinx_build(str(out)), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  pages = {p[:-3] for p in os.listdir(os.path.join(REPO, "docs")) if p.endswith(".md")}
  assert pages <= {p[:-5] for p in os.listdir(out) if p.endswith(".html")}
  api = (out / "api.html").read_text()
  for name in ("fairgen.api.load", "fairgen.api.Run.sample", "fairgen.api.load_config",
               "fairgen.train.train", "fairgen.registry.Registry"):
    assert f'id="{name}"' in api, name  # autodoc found and rendered it


def test_a_broken_link_fails_the_build(tmp_path):
  """The build's link check is live: a link to a missing heading is an error under -W."""
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "conf.py").write_text(open(os.path.join(REPO, "docs", "conf.py")).read())
  (docs / "index.md").write_text("# Home\n\n[gone](other.md#no-such-heading)\n\n"
                                 "```{toctree}\nother\n```\n")
  (docs / "other.md").write_text("# Other\n")
  result = subprocess.run(doc_commands.sphinx_build(str(tmp_path / "html"), str(docs)),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "no-such-heading" in result.stderr


def test_every_code_block_names_its_language_and_how_it_runs():
  problems = [p for b in ALL_BLOCKS for p in doc_commands.problems(b)]
  assert not problems, "\n".join(problems)
  assert sum(b.marker == "smoke" for b in ALL_BLOCKS) >= 15


def test_an_unmarked_or_unknown_block_is_refused():
  block = doc_commands.Block("README.md", 1, "bash", "", "python -m fairgen.main")
  assert doc_commands.problems(block)
  for marker in ("maybe", "no, ", "tested by me", "smoke please"):
    assert doc_commands.problems(doc_commands.Block("x.md", 1, "python", marker, "1"))
  assert doc_commands.problems(doc_commands.Block("x.md", 1, "", "smoke", "ls"))
  assert not doc_commands.problems(doc_commands.Block("x.md", 1, "bash", "no, needs a TPU", ""))


def test_smoke_forms_take_the_smoke_variant_and_a_temporary_root():
  form = doc_commands.smoke_form
  assert form("pip install -e . && python -m fairgen.main --config=experiments/a.py "
              "--workdir=/tmp/fg/x", "/r") == (
                  "python -m fairgen.main --config=experiments/a.py:smoke --workdir=/r/fg/x")
  assert form("python -m fairgen.main --config=experiments/a.py:eps=1 --workdir=/tmp/fg/x "
              "--config.train.num_steps=6000  # resume", "/r") == (
                  "python -m fairgen.main --config=experiments/a.py:eps=1,smoke "
                  "--workdir=/r/fg/x --config.train.num_steps=8")
  assert form("XLA_FLAGS=--a=8 python -m fairgen.main --config=e/b.py:smoke", "/r") == (
      'XLA_FLAGS="--a=8 ${XLA_FLAGS:-}" python -m fairgen.main --config=e/b.py:smoke')
  assert form("python tools/train_classifier.py --dataset=d", "/r").endswith(
      " ".join(doc_commands.CLASSIFIER_SMOKE))


def test_ci_blocks_are_what_ci_runs():
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  blocks = [b for b in ALL_BLOCKS if b.marker == "ci"]
  assert blocks
  for block in blocks:
    for command in doc_commands.commands(block.text):
      assert command in ci, f"{block.where}: {command!r} is not .ci/run's command"


def _scripts(text: str) -> set[str]:
  """The repository scripts a block runs (``tools/x.py``, ``experiments/repro/x.py``)."""
  return {os.path.basename(s) for s in re.findall(r"\b(?:tools|experiments/repro)/\w+\.py", text)}


def test_tested_by_markers_name_a_test_that_runs_the_block():
  for block in ALL_BLOCKS:
    if not block.marker.startswith("tested by "):
      continue
    path, _, name = block.marker[len("tested by "):].partition("::")
    assert os.path.isfile(os.path.join(REPO, path)), f"{block.where}: no {path}"
    source = open(os.path.join(REPO, path)).read()
    assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{block.where}: {name}"
    for script in _scripts(block.text):
      assert script in source, f"{block.where}: {path} never runs {script}"


def _anchors(path: str) -> set[str]:
  """The heading anchors of a Markdown file, as GitHub and MyST spell them."""
  text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
  slugs = set()
  for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    slugs.add(slug.replace(" ", "-"))
  return slugs


def test_the_readmes_links_reach_existing_pages_and_headings():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)", text)
  assert len(links) >= 10
  for target, anchor in links:
    path = os.path.join(REPO, target)
    assert os.path.isfile(path), target
    if anchor:
      assert anchor in _anchors(path), f"{target}#{anchor}"


def test_the_readme_is_short_and_holds_no_results():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert len(text.splitlines()) <= 200
  assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "dated measurements go to docs/"


SMOKE_PAGES = [p for p in PAGES
               if any(b.marker == "smoke" for b in doc_commands.blocks(p))]


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
  """One directory (and set of commands already run) for every page of this module."""
  return str(tmp_path_factory.mktemp("docs_commands")), set()


@pytest.mark.parametrize("page", SMOKE_PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_the_pages_commands_run_in_their_smoke_form(page, shared_root):
  root, done = shared_root
  outcomes = doc_commands.run_smoke_blocks(page, root, subprocess_env(), done)
  for o in outcomes:
    assert o.returncode == 0, f"{o.where}: {o.what}\n{o.output}"
