"""Sphinx configuration for the kombu_rpc documentation.

Build with ``sphinx-build -W -n --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Import kombu_rpc from this checkout; it does not need to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kombu_rpc

project = "kombu_rpc"
author = "kombu_rpc contributors"
copyright = "kombu_rpc contributors"
release = kombu_rpc.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]

# -- autodoc / napoleon --------------------------------------------------------------

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- HTML ----------------------------------------------------------------------------

# Furo: a wide content column (long code lines scroll instead of being cut off),
# previous/next links under every page, a search box and a light/dark switch.
html_theme = "furo"
html_title = f"kombu_rpc {release}"
html_theme_options = {
    "navigation_with_keys": True,  # left/right arrow keys go to the previous/next page
}

# -- sphinx-copybutton -----------------------------------------------------------------
# The copy button copies the commands only: not the ``$`` and ``>>>`` prompts, nor the
# output lines shown after them (Pygments marks both in ``console`` and ``pycon`` blocks,
# and in Python doctest blocks).

copybutton_exclude = ".linenos, .gp, .go"

# -- MyST ----------------------------------------------------------------------------

myst_enable_extensions = ["deflist"]
myst_heading_anchors = 3

# -- nitpicky mode ---------------------------------------------------------------------
# No intersphinx (the build runs offline), so references to classes of kombu and of the
# standard library cannot be resolved. Ignore exactly those; any unresolved reference to
# kombu_rpc itself still fails the build.

nitpicky = True
nitpick_ignore = [
    # Private helpers that appear in public signatures but are not part of the API.
    ("py:class", "kombu_rpc.registry.F"),  # the TypeVar of the @remote overloads
    ("py:class", "kombu_rpc.registry.H"),  # the TypeVar of @subscribe
    ("py:class", "kombu_rpc.proxy._T"),  # the interface of typed()
    ("py:class", "kombu_rpc.aio._T"),
    ("py:class", "kombu_rpc.interfaces._R"),  # the result of call_async() and call_map()
    ("py:class", "kombu_rpc.interfaces._A1"),  # the arguments of call_map()
    ("py:class", "kombu_rpc.interfaces._A2"),
    ("py:class", "kombu_rpc.interfaces._A3"),
    ("py:class", "CollectorRegistry"),  # prometheus_client's, in metrics.enable()
    ("py:class", "CancelledCalls"),  # a server's cancelled calls, in CallContext's signature
    ("py:class", "kombu_rpc._client.Client"),  # Stream's constructor: made by stream()
    ("py:class", "kombu_rpc._pending.CallParts"),
]
nitpick_ignore_regex = [
    (r"py:.*", r"(kombu|amqp)\..*"),  # kombu.Connection, kombu.Queue, amqp.transport.TCPTransport, ...
    (r"py:.*", r"(abc|enum|logging|concurrent\.futures|collections\.abc|inspect|re|types|argparse)\..*"),
]

_MISSING = object()


def _resolve_imported_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference to a kombu_rpc object through the name it is imported under.

    Docstrings name objects as Python code sees them: ``RPCTimeout`` in
    ``kombu_rpc._client`` (imported from ``kombu_rpc.errors``) or ``kombu_rpc.RPCServer``
    (re-exported by the package). Each object is documented once, in the module that
    defines it; this finds that module and resolves the reference there.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    context = node.get("py:module") or ""
    candidates = (
        [target] if target.startswith("kombu_rpc.") else [f"{context}.{target}", f"kombu_rpc.{target}"]
    )
    domain = env.domains["py"]
    for dotted in candidates:
        module_name, _, name = dotted.rpartition(".")
        module = sys.modules.get(module_name)
        if module is None or not name or not hasattr(module, name):
            continue
        obj = getattr(module, name)
        package_modules = sorted(m for m in sys.modules if m.split(".")[0] == "kombu_rpc")
        for other in package_modules:
            if other != module_name and vars(sys.modules[other]).get(name, _MISSING) is obj:
                resolved = domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], f"{other}.{name}", node, contnode
                )
                if resolved is not None:
                    return resolved
    return None


def _no_inline_type(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Keep napoleon from reading the opening words of an attribute's docstring as its type.

    Napoleon reads ``TEXT: description`` on the first line of a data, attribute or
    property docstring as ``type: description``. kombu_rpc never uses that form (types
    come from annotations), but some of its docstrings are prose with a colon, such as
    ``#: Valid remote names: dotted identifiers ...``. An empty reST comment put first
    makes napoleon keep the whole text as the description; the comment renders as nothing.
    """
    if what in ("data", "attribute", "property") and name.startswith("kombu_rpc.") and lines:
        lines[:0] = ["..", ""]


def _name_sentinel_defaults(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str
) -> tuple[str | None, str] | None:
    """Show a ``_UNSET`` default (meaning "not given") by name instead of ``<object object>``."""
    if signature and "<object object>" in signature and name.startswith("kombu_rpc."):
        return signature.replace("<object object>", "_UNSET"), return_annotation
    return None


def setup(app: Any) -> None:
    app.connect("missing-reference", _resolve_imported_names)
    app.connect("autodoc-process-docstring", _no_inline_type, priority=400)  # before napoleon
    app.connect("autodoc-process-signature", _name_sentinel_defaults)
