package main

import (
	"bytes"
	"strings"
	"testing"

	"vhive.dev/vhive/functions/sdk"
	"vhive.dev/vhive/functions/sdk/sdktest"
)

func TestHandle(t *testing.T) {
	out := sdktest.InputSets(t, func() sdk.Handler { return mustNew().handle })
	if !strings.HasPrefix(out[2], "chameleon set=2 rendered 200x25 table, ") {
		t.Errorf("replay = %q", out[2])
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
