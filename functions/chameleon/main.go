// Command chameleon is the Go twin of functions/python/chameleon: it
// renders an HTML table from a template compiled at start-up — with
// html/template instead of the Chameleon engine — so the same work runs on
// gVisor, runc and wasm.
//
// Tables: 20x10 cells by default, 100x20 for "record", 200x25 for "replay"
// (the same cells as the Python function). The reply is "chameleon set=<n>
// rendered <r>x<c> table, <len> bytes, sha256=<16 hex>", the same in every
// instance.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"html/template"
	"log/slog"
	"os"

	"vhive.dev/vhive/functions/sdk"
)

const page = `<html>
  <head><title>{{.Title}}</title></head>
  <body>
    <h1>{{.Title}}</h1>
    <table>
{{- range .Rows}}
      <tr>{{range $i, $c := .}}<td class="{{if even $i}}even{{else}}odd{{end}}">{{$c}}</td>{{end}}</tr>
{{- end}}
    </table>
  </body>
</html>
`

var sizes = [3][2]int{{20, 10}, {100, 20}, {200, 25}}

type renderer struct{ tmpl *template.Template }

func newRenderer() (*renderer, error) {
	t, err := template.New("table").Funcs(template.FuncMap{"even": func(i int) bool { return i%2 == 0 }}).Parse(page)
	if err != nil {
		return nil, fmt.Errorf("chameleon: parse template: %w", err)
	}
	return &renderer{tmpl: t}, nil
}

func (r *renderer) handle(_ context.Context, payload string) (string, error) {
	set := map[string]int{"record": 1, "replay": 2}[payload]
	nrows, ncols := sizes[set][0], sizes[set][1]
	rows := make([][]string, nrows)
	for i := range rows {
		rows[i] = make([]string, ncols)
		for c := range rows[i] {
			rows[i][c] = fmt.Sprintf("r%dc%d:%d", i, c, (i*31+c*17)%1000)
		}
	}
	var buf bytes.Buffer
	if err := r.tmpl.Execute(&buf, map[string]any{"Title": fmt.Sprintf("table %dx%d", nrows, ncols), "Rows": rows}); err != nil {
		return "", fmt.Errorf("chameleon: render: %w", err)
	}
	return fmt.Sprintf("chameleon set=%d rendered %dx%d table, %d bytes, sha256=%x", set, nrows, ncols, buf.Len(), sha256Prefix(buf.Bytes())), nil
}

func sha256Prefix(b []byte) []byte { s := sha256.Sum256(b); return s[:8] }

func mustNew() *renderer {
	r, err := newRenderer()
	if err != nil {
		slog.Error("start-up failed", "err", err)
		os.Exit(1)
	}
	return r
}

func main() { sdk.Run(mustNew().handle) }
