"""Write a runbook notebook from a list of cells (used while authoring; the
.ipynb files in notebooks/ are the source of truth once written).

    from tools.nbgen import write
    write("notebooks/01-rgw.ipynb", [
        ("md", "# 1. Deploy the RADOS Gateway ..."),
        ("params", 'rgw_host: str = "198.18.0.2"  # the RGW host'),
        ("code", 'import runbook_lib as rb\nctx = rb.begin("01-rgw", globals())'),
        ("check", "rgw.check(ctx)"),   # verdict cell: nbval compares its output
    ])
"""
import nbformat


def write(path, cells, title=None):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src))
        elif kind == "params":
            nb.cells.append(nbformat.v4.new_code_cell(src, metadata={"tags": ["parameters"]}))
        elif kind == "check":
            nb.cells.append(nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\n" + src, metadata={"tags": ["verdict"]}))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, path)
