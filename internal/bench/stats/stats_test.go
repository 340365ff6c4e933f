package stats

import (
	"math"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// Reference values computed with numpy (np.mean, np.std(ddof=1),
// np.percentile with the default linear method).
func TestKnownData(t *testing.T) {
	xs := []float64{2, 4, 4, 4, 5, 5, 7, 9}
	if got := Mean(xs); !near(got, 5) {
		t.Errorf("Mean = %v, want 5", got)
	}
	// population std is 2; sample std = sqrt(32/7)
	if got, want := StdDev(xs), math.Sqrt(32.0/7.0); !near(got, want) {
		t.Errorf("StdDev = %v, want %v", got, want)
	}
	cases := []struct{ p, want float64 }{
		{0, 2}, {50, 4.5}, {90, 7.6}, {99, 8.86}, {100, 9}, {25, 4},
	}
	for _, c := range cases {
		got, err := Percentile(xs, c.p)
		if err != nil {
			t.Fatal(err)
		}
		if !near(got, c.want) {
			t.Errorf("Percentile(p%g) = %v, want %v", c.p, got, c.want)
		}
	}
}

func TestPercentileUnsortedInputUntouched(t *testing.T) {
	xs := []float64{10, 1, 7, 3}
	got, err := Percentile(xs, 50)
	if err != nil {
		t.Fatal(err)
	}
	if !near(got, 5) {
		t.Errorf("p50 = %v, want 5", got)
	}
	if xs[0] != 10 || xs[1] != 1 {
		t.Errorf("input was reordered: %v", xs)
	}
}

func TestEdgeCases(t *testing.T) {
	if StdDev([]float64{42}) != 0 {
		t.Error("StdDev of one value must be 0, not NaN")
	}
	if Mean(nil) != 0 {
		t.Error("Mean(nil) must be 0")
	}
	if _, err := Percentile(nil, 50); err == nil {
		t.Error("Percentile of empty sample: want error")
	}
	if _, err := Percentile([]float64{1}, 101); err == nil {
		t.Error("Percentile 101: want error")
	}
	if _, err := Percentile([]float64{1}, math.NaN()); err == nil {
		t.Error("Percentile NaN: want error")
	}
	if got, _ := Percentile([]float64{3}, 99.9); got != 3 {
		t.Errorf("single value percentile = %v", got)
	}
}

func TestSummarize(t *testing.T) {
	xs := make([]float64, 1000)
	for i := range xs {
		xs[i] = float64(1000 - i) // 1000..1, reversed
	}
	s := Summarize(xs)
	if s.N != 1000 || s.Min != 1 || s.Max != 1000 {
		t.Fatalf("N/Min/Max = %d/%v/%v", s.N, s.Min, s.Max)
	}
	// numpy: np.percentile(np.arange(1,1001), [50,90,99,99.9])
	want := []float64{500.5, 900.1, 990.01, 999.001}
	got := []float64{s.P50, s.P90, s.P99, s.P999}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-6 {
			t.Errorf("percentile %d = %v, want %v", i, got[i], want[i])
		}
	}
	if !near(s.Mean, 500.5) {
		t.Errorf("Mean = %v", s.Mean)
	}
	if (Summarize(nil) != Summary{}) {
		t.Error("Summarize(nil) must be zero")
	}
}
