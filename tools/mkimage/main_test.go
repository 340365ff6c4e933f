package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRunFlags(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "-function NAME or -all"},
		{[]string{"-all", "-function", "helloworld"}, "not both"},
		{[]string{"-function", "helloworld", "-target", "arm"}, `-target "arm"`},
		{[]string{"-function", "helloworld", "-format", "zip"}, `-format "zip"`},
		{[]string{"-function", "helloworld", "extra"}, "unexpected arguments"},
		{[]string{"-function", "nosuch", "-out", t.TempDir()}, `function "nosuch"`},
	} {
		var out, errb strings.Builder
		err := run(ctx, tc.args, &out, &errb)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("run(%q) = %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

func TestRunBuildsLayout(t *testing.T) {
	out := t.TempDir()
	var stdout, stderr strings.Builder
	err := run(context.Background(), []string{"-function", "helloworld", "-target", "linux", "-format", "layout", "-out", out}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("run: %v (%s)", err, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "localhost/vhive/helloworld:latest sha256:") {
		t.Errorf("stdout = %q", stdout.String())
	}
	if _, err := os.Stat(filepath.Join(out, "helloworld", "index.json")); err != nil {
		t.Errorf("no layout written: %v", err)
	}
	if _, err := os.Stat(filepath.Join(out, "helloworld.tar")); !os.IsNotExist(err) {
		t.Errorf("-format layout also wrote a tarball (%v)", err)
	}
}
