"""chameleon: renders an HTML table with the Chameleon page-template engine
(the template is compiled at start-up): 20x10 cells by default, 100x20 for
"record", 200x25 for "replay". The reply carries the page size and digest."""

import hashlib

from chameleon import PageTemplate

TEMPLATE = """\
<html>
  <head><title>${title}</title></head>
  <body>
    <h1>${title}</h1>
    <table>
      <tr tal:repeat="row rows">
        <td tal:repeat="cell row" class="${'even' if repeat.cell.even else 'odd'}">${cell}</td>
      </tr>
    </table>
  </body>
</html>
"""
SIZES = {0: (20, 10), 1: (100, 20), 2: (200, 25)}
_template = None


def init(data_dir):
    global _template
    _template = PageTemplate(TEMPLATE)
    _template(title="warm-up", rows=[["x"]])  # compile now, not on the first request


def handle(name, input_set):
    nrows, ncols = SIZES[input_set]
    rows = [[f"r{r}c{c}:{(r * 31 + c * 17) % 1000}" for c in range(ncols)] for r in range(nrows)]
    page = _template(title=f"table {nrows}x{ncols}", rows=rows)
    digest = hashlib.sha256(page.encode()).hexdigest()[:16]
    return f"chameleon: set={input_set} rendered {nrows}x{ncols} table, {len(page)} bytes, sha256={digest}"
