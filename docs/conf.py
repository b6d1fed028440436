"""Sphinx configuration of fairgen's docs (Sphinx + MyST Markdown, the JAX libraries' stack).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py``
builds it the same way, offline). Warnings are errors: a broken internal link, a missing
page in the table of contents or a docstring that does not parse fails the build.
"""

project = "fairgen"
author = "the fairgen authors"
copyright = "2026, the fairgen authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# MyST: anchors for ## and ### headings, so pages link to each other's sections
# ([text](privacy.md#accounting)); a link to a missing page or anchor is a warning.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]
suppress_warnings = []

# The API reference: what the docstrings say, in source order, type hints in the signature.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "fairgen"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_static_path = []
