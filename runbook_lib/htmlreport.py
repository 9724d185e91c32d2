"""An executed notebook as one self-contained HTML file that renders offline.

    from runbook_lib.htmlreport import to_html
    to_html("runs/.../01-rgw.ipynb")            # -> runs/.../01-rgw.html

nbconvert's `lab` template inlines its CSS but loads require.js, MathJax and
mermaid from a CDN, and widget managers from unpkg: those blocks are emptied,
and any <script src>/<link href>/import() left pointing off the machine is
stripped, so opening the record makes no network request.  SVG outputs (the
topology) and markdown attachments are inline.  Every text is masked."""
from __future__ import annotations

import pathlib
import re

from . import masking

_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""

_REMOTE = r"""(?:https?:)?//[^"'\s>)]+"""
_SCRIPT_SRC = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*["']?""" + _REMOTE + r"""[^>]*>\s*</script>""", re.I)
_LINK_HREF = re.compile(r"""<link\b[^>]*\bhref\s*=\s*["']?""" + _REMOTE + r"""[^>]*/?>""", re.I)
_IMPORT = re.compile(r"""\bimport\(\s*["']""" + _REMOTE + r"""["']\s*\)""")
# What a browser would fetch by itself: src/href of scripts, styles, images, frames; CSS url(); import().
_FETCHED = re.compile(r"""<(?:script|link|img|iframe|source|embed)\b[^>]*\b(?:src|href)\s*=\s*["']?(""" + _REMOTE
                      + r""")|url\(\s*["']?(""" + _REMOTE + r""")|import\(\s*["'](""" + _REMOTE + r""")""", re.I)


def strip_remote(html: str) -> str:
    """Remove script/stylesheet tags and dynamic imports that point off the machine."""
    html = _SCRIPT_SRC.sub("", html)
    html = _LINK_HREF.sub("", html)
    return _IMPORT.sub("Promise.reject(new Error('offline record'))", html)


def remote_references(html: str) -> list[str]:
    """URLs off the machine that a browser would fetch on its own when opening this HTML
    (links a reader may click, <a href>, are not fetched and not listed)."""
    return sorted({next(g for g in m.groups() if g) for m in _FETCHED.finditer(html)})


def render(nb, name: str = "notebook") -> str:
    """HTML text for a notebook node (nbformat v4)."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"runbook_offline.html.j2": _TEMPLATE})],
                            template_file="runbook_offline.html.j2",
                            exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}})
    return masking.mask(strip_remote(body))


def to_html(nb_path, html_path=None) -> pathlib.Path:
    """Write the notebook at nb_path as offline HTML (default: beside it, .html).  Returns the path."""
    import nbformat

    nb_path = pathlib.Path(nb_path)
    html_path = pathlib.Path(html_path) if html_path else nb_path.with_suffix(".html")
    nb = nbformat.read(str(nb_path), as_version=4)
    text = render(nb, nb_path.stem)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(html_path)
    return html_path
