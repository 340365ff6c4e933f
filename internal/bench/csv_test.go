package bench

import (
	"encoding/csv"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func readCSV(t *testing.T, path string) [][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatalf("%s is not valid CSV: %v", path, err)
	}
	return rows
}

func TestMeanStdFormatAndHeaderOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cold.csv")
	a := []Sample{
		{"NewTask": 100, "GetImage": 10.9, "TaskStart": 1000},
		{"NewTask": 200, "GetImage": 11.9, "TaskStart": 3000},
	}
	if err := WriteMeanStd(path, "helloworld", a); err != nil {
		t.Fatal(err)
	}
	b := []Sample{{"NewTask": 5, "GetImage": 5, "TaskStart": 5}}
	if err := WriteMeanStd(path, "aes", b); err != nil {
		t.Fatal(err)
	}
	rows := readCSV(t, path)
	wantHeader := []string{"FuncName", "GetImage", "StdDev", "NewTask", "StdDev", "TaskStart", "StdDev", "Total", "StdDev"}
	if len(rows) != 3 {
		t.Fatalf("want header + 2 rows, got %d rows: %v", len(rows), rows)
	}
	if !slices.Equal(rows[0], wantHeader) {
		t.Errorf("header = %v, want %v", rows[0], wantHeader)
	}
	// GetImage mean 11.4 → "11" (truncated like vHive), std sqrt(0.5)=0.707 → "0.7";
	// NewTask 150 ± 70.7; TaskStart 2000 ± 1414.2; totals 1110.9, 3211.9 → 2161 ± 1485.6.
	want1 := []string{"helloworld", "11", "0.7", "150", "70.7", "2000", "1414.2", "2161", "1485.6"}
	if !slices.Equal(rows[1], want1) {
		t.Errorf("row 1 = %v, want %v", rows[1], want1)
	}
	want2 := []string{"aes", "5", "0.0", "5", "0.0", "5", "0.0", "15", "0.0"}
	if !slices.Equal(rows[2], want2) {
		t.Errorf("row 2 = %v, want %v", rows[2], want2)
	}
	raw, _ := os.ReadFile(path)
	if strings.Count(string(raw), "FuncName") != 1 {
		t.Errorf("header written more than once:\n%s", raw)
	}
}

func TestAppendRefusesDifferentHeader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cold.csv")
	if err := WriteMeanStd(path, "f", []Sample{{"A": 1}}); err != nil {
		t.Fatal(err)
	}
	err := WriteMeanStd(path, "f", []Sample{{"B": 1}})
	if !errors.Is(err, ErrHeaderMismatch) {
		t.Fatalf("want ErrHeaderMismatch, got %v", err)
	}
	if !strings.Contains(err.Error(), path) {
		t.Errorf("error does not name the file: %v", err)
	}
	if rows := readCSV(t, path); len(rows) != 2 {
		t.Errorf("mismatched rows were written: %v", rows)
	}
	if err := WriteMeanStd(path, "f", nil); err == nil {
		t.Error("no samples: want error")
	}
}

func TestPageStats(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pages.csv")
	if err := WritePageStats(path, "helloworld", 2400, 130, []float64{10, 12, 14}); err != nil {
		t.Fatal(err)
	}
	if err := WritePageStats(path, "aes", 100, 3, []float64{1}); err != nil {
		t.Fatal(err)
	}
	rows := readCSV(t, path)
	want := [][]string{
		{"FuncName", "RecPages", "RecRegions", "Unique", "StdDev"},
		{"helloworld", "2400", "130", "12", "2.0"},
		{"aes", "100", "3", "1", "0.0"},
	}
	if len(rows) != len(want) {
		t.Fatalf("rows = %v", rows)
	}
	for i := range want {
		if !slices.Equal(rows[i], want[i]) {
			t.Errorf("row %d = %v, want %v", i, rows[i], want[i])
		}
	}
}
