package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestHandle(t *testing.T) {
	r := mustNew()
	seen := map[string]bool{}
	for _, p := range []string{"x", "record", "replay"} {
		out, err := r.handle(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		again, _ := mustNew().handle(context.Background(), p)
		if out != again {
			t.Errorf("%s: %q vs %q", p, out, again)
		}
		seen[out] = true
		t.Log(out)
	}
	if len(seen) != 3 {
		t.Error("input sets do not differ")
	}
	if out, _ := r.handle(context.Background(), "replay"); !strings.HasPrefix(out, "chameleon set=2 rendered 200x25 table, ") {
		t.Errorf("replay = %q", out)
	}
}

func TestTemplateEscapes(t *testing.T) {
	var buf bytes.Buffer
	if err := mustNew().tmpl.Execute(&buf, map[string]any{"Title": "<b>", "Rows": [][]string{{"<script>", "b"}}}); err != nil {
		t.Fatal(err)
	}
	s := buf.String()
	if strings.Contains(s, "<script>") || !strings.Contains(s, "&lt;script&gt;") || strings.Count(s, "<td") != 2 || !strings.Contains(s, `class="odd"`) {
		t.Errorf("rendered %q", s)
	}
}
