package bench

import (
	"bytes"
	"encoding/xml"
	"image/png"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// checkPlotFiles asserts that files are a decodable PNG of a sane size and
// a well-formed SVG document.
func checkPlotFiles(t *testing.T, files []string) {
	t.Helper()
	if len(files) != 2 {
		t.Fatalf("want a PNG and an SVG, got %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		switch filepath.Ext(f) {
		case ".png":
			img, err := png.Decode(bytes.NewReader(b))
			if err != nil {
				t.Fatalf("%s: not a PNG: %v", f, err)
			}
			if r := img.Bounds(); r.Dx() < 300 || r.Dy() < 200 {
				t.Errorf("%s: tiny image %v", f, r)
			}
		case ".svg":
			d := xml.NewDecoder(bytes.NewReader(b))
			var root string
			for {
				tok, err := d.Token()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("%s: malformed SVG: %v", f, err)
				}
				if se, ok := tok.(xml.StartElement); ok && root == "" {
					root = se.Name.Local
				}
			}
			if root != "svg" {
				t.Errorf("%s: root element %q, want svg", f, root)
			}
			if !bytes.Contains(b, []byte("FcResume")) && !bytes.Contains(b, []byte("median")) {
				t.Errorf("%s: legend text missing", f)
			}
		default:
			t.Errorf("unexpected file %s", f)
		}
	}
}

func TestPlotBreakdown(t *testing.T) {
	base := filepath.Join(t.TempDir(), "breakdown")
	files, err := PlotBreakdown(base, "test", []Bar{
		{Label: "helloworld boot", Stages: Sample{"CreateSandbox": 120000, "StartSandbox": 300000}},
		{Label: "helloworld reap", Stages: Sample{"LoadVMM": 50000, "FcResume": 2000, "InstallWS": 8000}},
	})
	if err != nil {
		t.Fatal(err)
	}
	checkPlotFiles(t, files)
	if _, err := PlotBreakdown(base, "x", nil); err == nil {
		t.Error("no bars: want error")
	}
}

func TestPlotLines(t *testing.T) {
	base := filepath.Join(t.TempDir(), "lines")
	files, err := PlotLines(base, "conc", "N", "ms", []Series{
		{Name: "reap median", X: []float64{1, 2, 4, 8}, Y: []float64{70, 90, 120, 185}},
		{Name: "reap p90", X: []float64{1, 2, 4, 8}, Y: []float64{75, 99, 130, 200}},
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	checkPlotFiles(t, files)
	// One concurrency level (vhive bench concurrency --levels 1).
	one, err := PlotLines(filepath.Join(t.TempDir(), "one"), "conc", "N", "ms", []Series{{Name: "reap median", X: []float64{1}, Y: []float64{70}}}, true)
	if err != nil {
		t.Fatalf("a single x value on a log axis: %v", err)
	}
	checkPlotFiles(t, one)
	if _, err := PlotLines(base, "x", "", "", []Series{{Name: "bad", X: []float64{0}, Y: []float64{1}}}, true); err == nil {
		t.Error("x=0 on a log axis: want error")
	}
	if _, err := PlotLines(base, "x", "", "", []Series{{Name: "bad", X: []float64{1, 2}, Y: []float64{1}}}, false); err == nil {
		t.Error("length mismatch: want error")
	}
}
