// Package stats holds the few summary statistics the bench and the invoker
// report: mean, sample standard deviation and percentiles.
//
// Conventions (kept identical to vHive's tools so figures compare):
//   - StdDev is the sample standard deviation (n-1 in the denominator), as
//     gonum's stat.MeanStdDev that vHive's PrintMeanStd uses; it is 0 for
//     fewer than two values instead of NaN.
//   - Percentile interpolates linearly between the two closest ranks
//     (numpy's default, "R-7"), so p50 of an even count is the midpoint.
package stats

import (
	"fmt"
	"math"
	"slices"
)

// Mean returns the arithmetic mean of xs, or 0 for an empty slice.
func Mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

// StdDev returns the sample standard deviation of xs (n-1 denominator), or
// 0 when xs has fewer than two values.
func StdDev(xs []float64) float64 {
	if len(xs) < 2 {
		return 0
	}
	m := Mean(xs)
	var ss float64
	for _, x := range xs {
		d := x - m
		ss += d * d
	}
	return math.Sqrt(ss / float64(len(xs)-1))
}

// Percentile returns the p-th percentile (0 <= p <= 100) of xs using linear
// interpolation between closest ranks. xs need not be sorted and is not
// modified. It returns an error for an empty slice or p out of range.
func Percentile(xs []float64, p float64) (float64, error) {
	if len(xs) == 0 {
		return 0, fmt.Errorf("percentile p%g of an empty sample", p)
	}
	if p < 0 || p > 100 || math.IsNaN(p) {
		return 0, fmt.Errorf("percentile %g out of range [0, 100]", p)
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return percentileSorted(s, p), nil
}

func percentileSorted(s []float64, p float64) float64 {
	if len(s) == 1 {
		return s[0]
	}
	rank := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(rank))
	hi := int(math.Ceil(rank))
	frac := rank - float64(lo)
	return s[lo] + (s[hi]-s[lo])*frac
}

// Summary describes one sample.
type Summary struct {
	N      int
	Mean   float64
	StdDev float64
	Min    float64
	P50    float64
	P90    float64
	P99    float64
	P999   float64
	Max    float64
}

// Summarize computes a Summary of xs. An empty sample gives the zero
// Summary (N == 0), which callers print as "no data".
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return Summary{
		N:      len(s),
		Mean:   Mean(s),
		StdDev: StdDev(s),
		Min:    s[0],
		P50:    percentileSorted(s, 50),
		P90:    percentileSorted(s, 90),
		P99:    percentileSorted(s, 99),
		P999:   percentileSorted(s, 99.9),
		Max:    s[len(s)-1],
	}
}
